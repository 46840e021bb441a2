//! The exit statuses of `flotilla-producer`, so that a script, a CI job or
//! systemd can tell how a rollout ended without reading its output. The
//! README's "Exit status" table lists them; they are a stable interface.

use crate::{FollowError, ProducerError, state::CampaignState};
use flotilla_common::{BrokerError, Decision};
use std::{error::Error, process::ExitCode};

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; for `run` and `status --watch`, every device succeeded.
    Succeeded,
    /// An error none of the codes below names (a file that cannot be
    /// written, a campaign another producer is running, ...).
    Error,
    /// The command line, the campaign file or the inventory is wrong, the
    /// campaign is unknown, it was started with other files, or the
    /// broker has no Flotilla queues with the given prefix.
    BadInput,
    /// RabbitMQ could not be reached, or the connection to it was lost.
    Unreachable,
    /// RabbitMQ turned the login down (user, password, vhost): retrying
    /// with the same settings cannot help.
    Refused,
    /// The campaign completed, and some devices failed or timed out.
    Failures,
    /// The campaign was cancelled.
    Cancelled,
    /// `run` detached from a paused campaign (`--detach-on-pause`, or
    /// Ctrl-C/SIGTERM while paused): `resume`, then run it again.
    Paused,
    /// `run` detached from a running campaign (Ctrl-C or SIGTERM): run
    /// the same command again to resume it.
    Detached,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Succeeded => 0,
            Exit::Error => 1,
            Exit::BadInput => 2,
            Exit::Unreachable => 3,
            Exit::Refused => 4,
            Exit::Failures => 10,
            Exit::Cancelled => 11,
            Exit::Paused => 12,
            Exit::Detached => 130,
        }
    }

    /// How a campaign that has come to its end ended.
    pub fn of_campaign(state: &CampaignState) -> Exit {
        let cancelled = state
            .decisions()
            .iter()
            .any(|d| d.decision == Decision::Cancelled);
        if cancelled {
            Exit::Cancelled
        } else if state.totals().failed > 0 {
            Exit::Failures
        } else {
            Exit::Succeeded
        }
    }

    /// The code an error exits with: the first error in its chain that
    /// says what went wrong decides.
    pub fn of_error(error: &(dyn Error + 'static)) -> Exit {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(exit) = classify(error) {
                return exit;
            }
            next = error.source();
        }
        Exit::Error
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// A mistake in what the operator asked for, in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn classify(error: &(dyn Error + 'static)) -> Option<Exit> {
    if error.is::<BadInput>() {
        return Some(Exit::BadInput);
    }
    if let Some(error) = error.downcast_ref::<BrokerError>() {
        return Some(of_broker(error));
    }
    if let Some(error) = error.downcast_ref::<FollowError>() {
        return Some(match error {
            FollowError::Broker(error) => of_broker(error),
            FollowError::Quiet(_) => Exit::Error,
        });
    }
    if let Some(error) = error.downcast_ref::<lapin::Error>() {
        return Some(of_broker(&BrokerError::Amqp(error.clone())));
    }
    // Transparent variants forward `source()` to what they wrap, so the
    // walk never meets a `BrokerError` they hold: match them here.
    let error = error.downcast_ref::<ProducerError>()?;
    Some(match error {
        ProducerError::Campaign(_)
        | ProducerError::Inventory { .. }
        | ProducerError::Io { .. }
        | ProducerError::InventoryChanged(_)
        | ProducerError::Mismatch { .. }
        | ProducerError::Plan(_) => Exit::BadInput,
        ProducerError::Broker(error) => of_broker(error),
        // Its source, a lapin error if any, decides.
        ProducerError::Topology(_) => return None,
        // A campaign another producer is running, and whatever is added
        // later until it is given a code of its own.
        _ => Exit::Error,
    })
}

/// RabbitMQ's reply code for a queue that does not exist.
const NOT_FOUND: u16 = 404;

fn of_broker(error: &BrokerError) -> Exit {
    if let BrokerError::Amqp(error) = error
        && let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
        && amqp.get_id() == NOT_FOUND
    {
        // The streams a command reads are missing: no Flotilla with this
        // prefix on this vhost, so the prefix or the URL is wrong.
        return Exit::BadInput;
    }
    if error.is_refused() {
        Exit::Refused
    } else if error.is_unreachable() {
        Exit::Unreachable
    } else if matches!(error, BrokerError::BadUrl { .. }) {
        Exit::BadInput
    } else {
        Exit::Error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{DecisionCounts, DecisionEvent, Ending, Event, EventBody, Outcome};

    fn decision(seq: u32, decision: Decision) -> Event {
        Event::new(
            "c",
            EventBody::Decision(DecisionEvent {
                seq,
                decision,
                reason: String::new(),
                counts: DecisionCounts::default(),
                thresholds: Default::default(),
                control_offset: None,
            }),
        )
    }

    fn finished(device: &str, outcome: Outcome) -> Event {
        Event::new(
            "c",
            EventBody::Finished(flotilla_common::FinishedEvent {
                device: device.into(),
                kind: flotilla_common::DeviceKind::Dms,
                seq: 1,
                last_step: "poll".into(),
                ending: Ending {
                    outcome,
                    ..Ending::succeeded()
                },
                started_at: None,
            }),
        )
    }

    fn campaign(outcomes: &[Outcome], cancelled: bool) -> CampaignState {
        let mut state = CampaignState::new("c");
        state.apply(&decision(
            1,
            Decision::Started {
                devices: outcomes.len() as u64,
                waves: vec![outcomes.len() as u64],
                fingerprint: String::new(),
                target_version: "1".into(),
            },
        ));
        if cancelled {
            state.apply(&decision(2, Decision::Cancelled));
        }
        for (i, outcome) in outcomes.iter().enumerate() {
            state.apply(&finished(&format!("d{i}"), *outcome));
        }
        state.apply(&decision(3, Decision::Completed));
        state
    }

    #[test]
    fn a_campaign_exits_by_how_it_ended() {
        use Outcome::*;
        assert_eq!(
            Exit::of_campaign(&campaign(&[Succeeded, Succeeded], false)),
            Exit::Succeeded
        );
        assert_eq!(
            Exit::of_campaign(&campaign(&[Succeeded, TimedOut], false)),
            Exit::Failures
        );
        assert_eq!(
            Exit::of_campaign(&campaign(&[Succeeded, Cancelled], true)),
            Exit::Cancelled
        );
    }

    #[test]
    fn errors_exit_by_what_went_wrong() {
        let refused = BrokerError::Refused {
            url: "amqp://x".into(),
            user: "guest".into(),
            vhost: "/x".into(),
            reason: "access refused".into(),
        };
        let unreachable = BrokerError::Unreachable {
            url: "amqp://x".into(),
            reason: "connection refused".into(),
        };
        let of = |error: ProducerError| Exit::of_error(&error);
        assert_eq!(of(ProducerError::Broker(refused)), Exit::Refused);
        assert_eq!(of(ProducerError::Broker(unreachable)), Exit::Unreachable);
        assert_eq!(of(ProducerError::Plan("no waves".into())), Exit::BadInput);
        assert_eq!(
            of(ProducerError::AlreadyRunning {
                campaign: "c".into()
            }),
            Exit::Error
        );
        let wrapped = anyhow::Error::new(BadInput("no campaign c".into())).context("status");
        assert_eq!(Exit::of_error(wrapped.as_ref()), Exit::BadInput);
    }
}
