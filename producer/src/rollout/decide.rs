//! What the controller does next, decided from the campaign's state alone.
//!
//! A pure function, so every rule (waves, gates, budgets, the window) is
//! tested without a broker, and a restarted controller decides exactly as
//! the one before it would have.

use crate::{
    campaign::{Budget, Rollout},
    state::{CampaignState, Phase},
};
use chrono::{DateTime, Utc};
use flotilla_common::{Decision, PauseCause, Thresholds};

#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Write this decision.
    Decide {
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
    },
    /// Start up to this many more devices of the current wave.
    Start(u64),
    /// The campaign is cancelled: record the devices never started as
    /// cancelled.
    CancelUnstarted,
    /// Nothing to do until an event arrives, a command comes, or this time.
    Wait(Option<DateTime<Utc>>),
    /// The campaign is over.
    Done,
}

fn decide(decision: Decision, reason: String) -> Next {
    Next::Decide {
        decision,
        reason,
        thresholds: Thresholds::default(),
    }
}

pub fn next(state: &CampaignState, rollout: &Rollout, now: DateTime<Utc>) -> Next {
    let totals = state.totals();
    let devices = state.device_count();
    match state.phase() {
        Phase::Completed => return Next::Done,
        Phase::New => return Next::Wait(None),
        Phase::Cancelled => {
            return if state.unstarted() > 0 {
                Next::CancelUnstarted
            } else if totals.finished >= devices {
                decide(
                    Decision::Completed,
                    "every device finished after the cancel".into(),
                )
            } else {
                Next::Wait(None)
            };
        }
        Phase::Running | Phase::Paused(_) => {}
    }
    if totals.finished >= devices {
        return decide(
            Decision::Completed,
            format!("all {devices} devices finished"),
        );
    }
    if let Phase::Paused(_) = state.phase() {
        return Next::Wait(None);
    }
    if let Some(pause) = budget_exceeded(state, rollout) {
        return pause;
    }
    let Some(wave) = state.current_wave() else {
        return decide(
            Decision::WaveStarted { wave: 0 },
            format!(
                "starting wave 1 of {} ({} devices)",
                state.wave_count(),
                state.wave_size(0)
            ),
        );
    };
    let size = state.wave_size(wave);
    let tally = state.wave(wave);
    if tally.published < size {
        if let Some(window) = &rollout.window
            && !window.is_open(now)
        {
            let opens_at = window.next_open(now);
            return match state.window_closed_until() {
                Some(until) if until >= opens_at => Next::Wait(Some(opens_at)),
                _ => decide(
                    Decision::WindowClosed { opens_at },
                    format!("outside the maintenance window; devices start again at {opens_at}"),
                ),
            };
        }
        return Next::Start(size - tally.published);
    }
    if wave + 1 >= state.wave_count() {
        return Next::Wait(None);
    }
    if state.released(wave) || (state.gate_passed(wave) && !rollout.approval) {
        return decide(
            Decision::WaveStarted { wave: wave + 1 },
            format!(
                "starting wave {} of {} ({} devices)",
                wave + 2,
                state.wave_count(),
                state.wave_size(wave + 1)
            ),
        );
    }
    if state.gate_passed(wave) {
        return Next::Decide {
            decision: Decision::Paused {
                cause: PauseCause::Approval,
            },
            reason: format!(
                "wave {} passed its gate; waiting for approval (`resume`) to start wave {}",
                wave + 1,
                wave + 2
            ),
            thresholds: gate_threshold(rollout),
        };
    }
    let gate_met = match rollout.success_gate {
        Some(gate) => tally.succeeded as f64 >= (gate * size as f64).ceil(),
        None => tally.finished >= size,
    };
    if gate_met {
        return Next::Decide {
            decision: Decision::GatePassed { wave },
            reason: match rollout.success_gate {
                Some(gate) => format!(
                    "wave {}: {} of {size} succeeded, at least {:.0}% needed",
                    wave + 1,
                    tally.succeeded,
                    gate * 100.0
                ),
                None => format!("wave {}: all {size} devices finished", wave + 1),
            },
            thresholds: gate_threshold(rollout),
        };
    }
    if tally.finished >= size {
        return Next::Decide {
            decision: Decision::Paused {
                cause: PauseCause::GateNotMet,
            },
            reason: format!(
                "wave {} finished with {} of {size} succeeded, below the {:.0}% gate",
                wave + 1,
                tally.succeeded,
                rollout.success_gate.unwrap_or(1.0) * 100.0
            ),
            thresholds: gate_threshold(rollout),
        };
    }
    Next::Wait(None)
}

fn gate_threshold(rollout: &Rollout) -> Thresholds {
    Thresholds {
        success_gate: rollout.success_gate,
        ..Thresholds::default()
    }
}

/// A pause if failures since the last resume pass a budget.
fn budget_exceeded(state: &CampaignState, rollout: &Rollout) -> Option<Next> {
    let counts = state.counts();
    let base = state.baseline();
    let check = |budget: &Budget, finished: u64, failed: u64| {
        finished >= budget.min_finished && failed as f64 > budget.ratio * finished as f64
    };
    if let (Some(budget), Some(wave)) = (&rollout.wave_budget, counts.wave) {
        let (finished, failed) = if base.wave == Some(wave) {
            (
                counts.wave_finished - base.wave_finished,
                counts.wave_failed - base.wave_failed,
            )
        } else {
            (counts.wave_finished, counts.wave_failed)
        };
        if check(budget, finished, failed) {
            return Some(budget_pause(
                PauseCause::WaveBudget,
                format!("wave {}", wave + 1),
                budget,
                finished,
                failed,
            ));
        }
    }
    if let Some(budget) = &rollout.campaign_budget {
        let finished = counts.finished - base.finished;
        let failed = counts.failed - base.failed;
        if check(budget, finished, failed) {
            return Some(budget_pause(
                PauseCause::CampaignBudget,
                "the campaign".into(),
                budget,
                finished,
                failed,
            ));
        }
    }
    None
}

fn budget_pause(
    cause: PauseCause,
    scope: String,
    budget: &Budget,
    finished: u64,
    failed: u64,
) -> Next {
    Next::Decide {
        decision: Decision::Paused { cause },
        reason: format!(
            "failure budget passed in {scope}: {failed} of {finished} finished devices failed, more than {:.0}%",
            budget.ratio * 100.0
        ),
        thresholds: Thresholds {
            failure_ratio: Some(budget.ratio),
            min_finished: Some(budget.min_finished),
            ..Thresholds::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{plan::WaveSize, window::Window};
    use flotilla_common::{
        DecisionEvent, DeviceKind, Ending, ErrorClass, Event, EventBody, FinishedEvent,
        PublishedEvent,
    };

    /// A campaign of `devices` in waves ending at `ends`, fed events by hand.
    struct Script {
        state: CampaignState,
    }

    impl Script {
        fn new(devices: u64, ends: &[u64]) -> Self {
            let mut script = Script {
                state: CampaignState::new("c"),
            };
            script.decision(Decision::Started {
                devices,
                waves: ends.to_vec(),
                fingerprint: "f".into(),
                target_version: "7.2".into(),
            });
            script
        }

        fn decision(&mut self, decision: Decision) {
            let event = Event::new(
                "c",
                EventBody::Decision(DecisionEvent {
                    seq: self.state.next_decision_seq(),
                    decision,
                    reason: String::new(),
                    counts: self.state.counts(),
                    thresholds: Thresholds::default(),
                    control_offset: None,
                }),
            );
            self.state.apply(&event);
        }

        fn apply_next(&mut self, rollout: &Rollout) -> Next {
            let next = next(&self.state, rollout, Utc::now());
            if let Next::Decide { decision, .. } = &next {
                self.decision(decision.clone());
            }
            next
        }

        fn publish(&mut self, from: u64, to: u64, wave: u32) {
            for i in from..to {
                self.state.apply(&Event::new(
                    "c",
                    EventBody::Published(PublishedEvent {
                        device: format!("d{i}"),
                        kind: DeviceKind::Dms,
                        wave: Some(wave),
                    }),
                ));
            }
        }

        fn finish(&mut self, device: u64, ending: Ending) {
            self.state.apply(&Event::new(
                "c",
                EventBody::Finished(FinishedEvent {
                    device: format!("d{device}"),
                    kind: DeviceKind::Dms,
                    seq: 3,
                    last_step: "deactivate_rule".into(),
                    ending,
                    started_at: None,
                }),
            ));
        }
    }

    fn failed() -> Ending {
        Ending::failed(ErrorClass::Device, "FaultCode 9010")
    }

    fn decided(next: &Next) -> &Decision {
        match next {
            Next::Decide { decision, .. } => decision,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    #[test]
    fn waves_start_in_turn_behind_their_gate() {
        let rollout = Rollout {
            waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
            success_gate: Some(0.5),
            ..Rollout::default()
        };
        let mut script = Script::new(6, &[2, 6]);
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::WaveStarted { wave: 0 }
        );
        assert_eq!(script.apply_next(&rollout), Next::Start(2));
        script.publish(0, 2, 0);
        // Started but nothing finished: wait.
        assert_eq!(script.apply_next(&rollout), Next::Wait(None));
        // One of two succeeded: the 50% gate passes without waiting for the other.
        script.finish(0, Ending::succeeded());
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::GatePassed { wave: 0 }
        );
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::WaveStarted { wave: 1 }
        );
        assert_eq!(script.apply_next(&rollout), Next::Start(4));
        script.publish(2, 6, 1);
        for device in 1..6 {
            script.finish(device, Ending::succeeded());
        }
        assert_eq!(decided(&script.apply_next(&rollout)), &Decision::Completed);
        assert_eq!(script.apply_next(&rollout), Next::Done);
    }

    #[test]
    fn a_wave_below_its_gate_pauses_until_an_operator_resumes() {
        let rollout = Rollout {
            waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
            success_gate: Some(1.0),
            ..Rollout::default()
        };
        let mut script = Script::new(4, &[2, 4]);
        script.apply_next(&rollout);
        script.publish(0, 2, 0);
        script.finish(0, Ending::succeeded());
        script.finish(1, failed());
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::Paused {
                cause: PauseCause::GateNotMet
            }
        );
        assert_eq!(script.apply_next(&rollout), Next::Wait(None));
        script.decision(Decision::Resumed);
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::WaveStarted { wave: 1 }
        );
    }

    #[test]
    fn approval_holds_the_next_wave_after_the_gate() {
        let rollout = Rollout {
            waves: vec![WaveSize::Count(1), WaveSize::Percent(100.0)],
            approval: true,
            ..Rollout::default()
        };
        let mut script = Script::new(3, &[1, 3]);
        script.apply_next(&rollout);
        script.publish(0, 1, 0);
        script.finish(0, Ending::succeeded());
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::GatePassed { wave: 0 }
        );
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::Paused {
                cause: PauseCause::Approval
            }
        );
        script.decision(Decision::Resumed);
        assert_eq!(
            decided(&script.apply_next(&rollout)),
            &Decision::WaveStarted { wave: 1 }
        );
    }

    #[test]
    fn a_budget_pauses_and_counts_only_failures_after_a_resume() {
        let rollout = Rollout {
            campaign_budget: Some(Budget {
                ratio: 0.25,
                min_finished: 4,
            }),
            ..Rollout::default()
        };
        let mut script = Script::new(20, &[20]);
        script.apply_next(&rollout);
        script.publish(0, 20, 0);
        script.finish(0, failed());
        script.finish(1, failed());
        script.finish(2, Ending::succeeded());
        // Three finished: below the minimum, no judgement yet.
        assert_eq!(script.apply_next(&rollout), Next::Wait(None));
        script.finish(3, Ending::succeeded());
        let next = script.apply_next(&rollout);
        assert_eq!(
            decided(&next),
            &Decision::Paused {
                cause: PauseCause::CampaignBudget
            }
        );
        let Next::Decide {
            reason, thresholds, ..
        } = next
        else {
            unreachable!()
        };
        assert!(
            reason.contains("2 of 4 finished devices failed, more than 25%"),
            "{reason}"
        );
        assert_eq!(thresholds.failure_ratio, Some(0.25));

        script.decision(Decision::Resumed);
        // The two old failures are forgiven; four new successes keep it going.
        for device in 4..8 {
            script.finish(device, Ending::succeeded());
        }
        assert_eq!(script.apply_next(&rollout), Next::Wait(None));
    }

    #[test]
    fn a_closed_window_is_recorded_once_then_waited_for() {
        // A window that is never open now: a one-hour window on another day.
        let now = Utc::now();
        let other_day = (now + chrono::Duration::days(3))
            .format("%a")
            .to_string()
            .to_lowercase();
        let rollout = Rollout {
            window: Some(Window::parse(&[other_day], "03:00", "04:00", "UTC").unwrap()),
            ..Rollout::default()
        };
        let mut script = Script::new(5, &[5]);
        script.apply_next(&rollout);
        let Decision::WindowClosed { opens_at } = decided(&script.apply_next(&rollout)).clone()
        else {
            panic!("expected the window to be closed");
        };
        assert!(opens_at > now);
        assert_eq!(script.apply_next(&rollout), Next::Wait(Some(opens_at)));
    }

    #[test]
    fn a_cancelled_campaign_records_its_unstarted_devices_then_completes() {
        let rollout = Rollout::default();
        let mut script = Script::new(3, &[3]);
        script.apply_next(&rollout);
        script.publish(0, 1, 0);
        script.decision(Decision::Cancelled);
        assert_eq!(script.apply_next(&rollout), Next::CancelUnstarted);
        for device in 1..3 {
            script.finish(device, Ending::cancelled());
        }
        assert_eq!(script.apply_next(&rollout), Next::Wait(None));
        script.finish(0, Ending::cancelled());
        assert_eq!(decided(&script.apply_next(&rollout)), &Decision::Completed);
    }
}
