//! Campaign commands (pause, resume, cancel) on the control stream, and the
//! mode they leave each campaign in.
//!
//! Workers and campaign controllers tail the stream from its start and fold
//! every command through a [`ControlBook`], so all of them agree on each
//! campaign's mode. Cancel is final: a later resume does not undo it.

use crate::{Broker, BrokerError, Message, Publisher, Topology};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const CONTROL_VERSION: u32 = 1;
/// The AMQP `type` of a control message.
pub const CONTROL_MESSAGE_TYPE: &str = "flotilla.control.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Cancel,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Cancel => "cancel",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlMessage {
    pub v: u32,
    pub at: DateTime<Utc>,
    pub campaign: String,
    pub command: Command,
    /// Who asked: `operator`, or `controller` for the campaign's own pauses.
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ControlMessage {
    pub fn new(campaign: &str, command: Command, by: &str, reason: Option<String>) -> Self {
        ControlMessage {
            v: CONTROL_VERSION,
            at: Utc::now(),
            campaign: campaign.to_owned(),
            command,
            by: by.to_owned(),
            reason,
        }
    }
}

/// What workers do with a campaign's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Running,
    /// Jobs wait in a delay queue without calling devices.
    Paused,
    /// Jobs run their driver's cleanup and end `cancelled`.
    Cancelled,
}

/// Every campaign's mode, folded from the control stream.
#[derive(Debug, Default, Clone)]
pub struct ControlBook {
    modes: HashMap<String, Mode>,
}

impl ControlBook {
    pub fn apply(&mut self, message: &ControlMessage) {
        let mode = self.modes.entry(message.campaign.clone()).or_default();
        if *mode == Mode::Cancelled {
            return;
        }
        *mode = match message.command {
            Command::Pause => Mode::Paused,
            Command::Resume => Mode::Running,
            Command::Cancel => Mode::Cancelled,
        };
    }

    pub fn mode(&self, campaign: &str) -> Mode {
        self.modes.get(campaign).copied().unwrap_or_default()
    }
}

/// Appends a command to the control stream, confirmed.
pub async fn send(
    broker: &Broker,
    topology: &Topology,
    message: &ControlMessage,
) -> Result<(), BrokerError> {
    let connection = broker.connection().await?;
    let publisher = Publisher::open(&connection).await?;
    let body = serde_json::to_vec(message).expect("a control message serializes to JSON");
    publisher
        .publish(
            &topology.control(),
            &body,
            Message::new(CONTROL_MESSAGE_TYPE),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_is_final_and_campaigns_are_separate() {
        let mut book = ControlBook::default();
        let command = |campaign, command| ControlMessage::new(campaign, command, "operator", None);
        book.apply(&command("a", Command::Pause));
        assert_eq!(book.mode("a"), Mode::Paused);
        assert_eq!(book.mode("b"), Mode::Running);
        book.apply(&command("a", Command::Resume));
        assert_eq!(book.mode("a"), Mode::Running);
        book.apply(&command("a", Command::Cancel));
        book.apply(&command("a", Command::Resume));
        assert_eq!(book.mode("a"), Mode::Cancelled);
    }
}
