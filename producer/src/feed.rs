//! Reading the events and control streams, decoded.

use crate::state::CampaignState;
use flotilla_common::{
    Broker, BrokerError, Event, Topology,
    control::ControlMessage,
    stream::{Offset, StreamReader},
};
use lapin::Connection;
use std::time::Duration;
use tracing::warn;

/// A quiet stream for this long has been read to its end.
pub const CAUGHT_UP: Duration = Duration::from_millis(400);

/// The events stream, from its start.
pub struct EventFeed {
    reader: StreamReader,
}

impl EventFeed {
    pub async fn open(connection: &Connection, topology: &Topology) -> Result<Self, BrokerError> {
        let reader = StreamReader::open(connection, &topology.events(), Offset::First).await?;
        Ok(EventFeed { reader })
    }

    /// The next event, waiting as long as it takes. Records this build
    /// cannot read are skipped with a warning.
    pub async fn next(&mut self) -> Result<Event, BrokerError> {
        loop {
            let record = self
                .reader
                .next()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            match record.decode() {
                Ok(event) => return Ok(event),
                Err(error) => {
                    warn!(offset = ?record.offset, %error, "skipping an event this build cannot read")
                }
            }
        }
    }

    /// The next event, or `None` if none comes within `idle`.
    pub async fn next_within(&mut self, idle: Duration) -> Result<Option<Event>, BrokerError> {
        match tokio::time::timeout(idle, self.next()).await {
            Ok(event) => event.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// The control stream, from its start, with each command's offset.
pub struct ControlFeed {
    reader: StreamReader,
}

impl ControlFeed {
    pub async fn open(connection: &Connection, topology: &Topology) -> Result<Self, BrokerError> {
        let reader = StreamReader::open(connection, &topology.control(), Offset::First).await?;
        Ok(ControlFeed { reader })
    }

    pub async fn next(&mut self) -> Result<(u64, ControlMessage), BrokerError> {
        loop {
            let record = self
                .reader
                .next()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            match (record.offset, record.decode()) {
                (Some(offset), Ok(message)) => return Ok((offset, message)),
                (_, Err(error)) => {
                    warn!(offset = ?record.offset, %error, "skipping a command this build cannot read")
                }
                (None, Ok(_)) => warn!("skipping a command without a stream offset"),
            }
        }
    }

    pub async fn next_within(
        &mut self,
        idle: Duration,
    ) -> Result<Option<(u64, ControlMessage)>, BrokerError> {
        match tokio::time::timeout(idle, self.next()).await {
            Ok(command) => command.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// A campaign as the events stream tells it now.
pub async fn read_campaign(
    broker: &Broker,
    topology: &Topology,
    campaign: &str,
) -> Result<CampaignState, BrokerError> {
    let mut state = CampaignState::new(campaign);
    let connection = broker.connection().await?;
    let mut feed = EventFeed::open(&connection, topology).await?;
    while let Some(event) = feed.next_within(CAUGHT_UP).await? {
        state.apply(&event);
    }
    Ok(state)
}

/// Reads the campaign's events from the start of the stream until `done`
/// says so, calling `progress` after each event of the campaign. Fails if
/// no event arrives for `quiet_limit`.
pub async fn follow_campaign(
    broker: &Broker,
    topology: &Topology,
    state: &mut CampaignState,
    quiet_limit: Duration,
    mut done: impl FnMut(&CampaignState) -> bool,
    mut progress: impl FnMut(&CampaignState),
) -> Result<(), FollowError> {
    if done(state) {
        return Ok(());
    }
    let connection = broker.connection().await?;
    let mut feed = EventFeed::open(&connection, topology).await?;
    loop {
        let event = feed
            .next_within(quiet_limit)
            .await?
            .ok_or(FollowError::Quiet(quiet_limit))?;
        if event.campaign != state.campaign() {
            continue;
        }
        state.apply(&event);
        progress(state);
        if done(state) {
            return Ok(());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("no event for {0:?}: are any workers running?")]
    Quiet(Duration),
}
