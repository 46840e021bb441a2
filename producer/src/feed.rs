//! Reading the events and control streams, decoded, and reading one
//! campaign's state from them at a cost bounded by the campaign.
//!
//! Every read ends at a marker of the reader's own (see
//! `flotilla_common::stream`): it has then seen every event written before
//! it started, however busy the stream is. Where to start comes from the
//! catalogue (`catalogue`): the campaign's first offset, its `completed`
//! offset once ended, or a snapshot a second old.

use crate::{
    ProducerError,
    catalogue::{Lookup, Recent},
    state::{CampaignState, Phase},
};
use flotilla_common::{
    Broker, BrokerError, Event, Topology,
    control::ControlMessage,
    stream::{self, Marker, Offset, StreamReader},
};
use lapin::Connection;
use std::{collections::VecDeque, time::Duration};
use tracing::{debug, warn};

/// The events stream, decoded, from a chosen offset. A record may hold
/// several events (see [`flotilla_common::EventRecord`]): each is handed
/// out with the record's offset.
pub struct EventFeed {
    reader: StreamReader,
    /// The events of the last record read not handed out yet.
    pending: VecDeque<(u64, Event)>,
}

impl EventFeed {
    pub async fn open(
        connection: &Connection,
        topology: &Topology,
        from: Offset,
    ) -> Result<Self, BrokerError> {
        let reader = StreamReader::open(connection, &topology.events(), from).await?;
        Ok(EventFeed {
            reader,
            pending: VecDeque::new(),
        })
    }

    /// The next event and its offset, waiting as long as it takes. Records
    /// this build cannot read are skipped with a warning.
    pub async fn next(&mut self) -> Result<(u64, Event), BrokerError> {
        loop {
            if let Some(next) = self.pending.pop_front() {
                return Ok(next);
            }
            let record = self
                .reader
                .next()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            match (record.offset, record.events()) {
                (Some(offset), Ok(events)) => self
                    .pending
                    .extend(events.into_iter().map(|event| (offset, event))),
                (_, Err(error)) => {
                    warn!(offset = ?record.offset, %error, "skipping an event this build cannot read")
                }
                (None, Ok(_)) => warn!("skipping an event without a stream offset"),
            }
        }
    }

    /// Reads everything written before now, handing each event to `each`.
    /// With `expect_first`, the record at that offset (where the reader was
    /// opened) must still be in the stream: if it is not, the records from
    /// it are gone, and `gone` says whose. With `end`, stops at that offset
    /// if it comes before the end. Returns the offset read up to (the
    /// marker's, or `end`).
    pub async fn catch_up(
        &mut self,
        connection: &Connection,
        expect_first: Option<(u64, Gone<'_>)>,
        end: Option<u64>,
        mut each: impl FnMut(u64, Event),
    ) -> Result<Option<u64>, ProducerError> {
        // The rest of a record `next` began.
        for (offset, event) in self.pending.drain(..) {
            each(offset, event);
        }
        // Where to stop: a marker of this reader's own. With `expect_first`,
        // the stream's bounds are learnt first: attached past the end of a
        // stream, a reader would wait for records that never come.
        let (marker, stop_at) = match expect_first {
            Some((wanted, gone)) => {
                let (oldest, end) = stream::bounds(connection, self.reader.stream()).await?;
                if wanted < oldest {
                    return Err(gone.error(wanted, Some(oldest)));
                }
                if wanted > end {
                    return Err(gone.error(wanted, Some(end)));
                }
                (None, Some(end))
            }
            None => (
                Some(Marker::publish(connection, self.reader.stream()).await?),
                None,
            ),
        };
        loop {
            let record = self
                .reader
                .next_any()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            if let (Some(stop_at), Some(offset)) = (stop_at, record.offset)
                && offset >= stop_at
            {
                return Ok(Some(stop_at));
            }
            match record.marker() {
                Some(id) if marker.as_ref().is_some_and(|m| m.is(&id)) => {
                    return Ok(record.offset);
                }
                Some(_) => continue,
                None => {}
            }
            let Some(offset) = record.offset else {
                continue;
            };
            match record.events() {
                Ok(events) => events.into_iter().for_each(|event| each(offset, event)),
                Err(error) => {
                    warn!(offset, %error, "skipping an event this build cannot read")
                }
            }
            if end.is_some_and(|end| offset >= end) {
                return Ok(Some(offset));
            }
        }
    }
}

/// Whose records are missing when a read finds the stream starting later
/// than it should.
#[derive(Debug, Clone, Copy)]
pub struct Gone<'a> {
    /// What needed them: "campaign fw-7.2", "the concurrency-cap ledger".
    pub whose: &'a str,
    pub topology: &'a Topology,
}

impl Gone<'_> {
    fn error(self, wanted: u64, found: Option<u64>) -> ProducerError {
        ProducerError::EventsGone {
            whose: self.whose.to_owned(),
            stream: self.topology.events(),
            wanted,
            found,
            retention: self.topology.retention().to_string(),
        }
    }
}

/// The control stream, from a chosen offset, with each command's offset.
pub struct ControlFeed {
    reader: StreamReader,
}

impl ControlFeed {
    pub async fn open(
        connection: &Connection,
        topology: &Topology,
        from: Offset,
    ) -> Result<Self, BrokerError> {
        let reader = StreamReader::open(connection, &topology.control(), from).await?;
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

    /// Every command written before now.
    pub async fn catch_up(
        &mut self,
        connection: &Connection,
    ) -> Result<Vec<(u64, ControlMessage)>, BrokerError> {
        let marker = Marker::publish(connection, self.reader.stream()).await?;
        let mut commands = Vec::new();
        self.reader
            .read_to(&marker, |record| match (record.offset, record.decode()) {
                (Some(offset), Ok(message)) => commands.push((offset, message)),
                _ => warn!(offset = ?record.offset, "skipping a command this build cannot read"),
            })
            .await?;
        Ok(commands)
    }
}

/// Every event of `campaign`, from its first to its `completed` decision
/// (or to now, if it has not ended). `false` if the catalogue does not know
/// the campaign.
pub async fn read_events(
    broker: &Broker,
    topology: &Topology,
    campaign: &str,
    mut each: impl FnMut(&Event),
) -> Result<bool, ProducerError> {
    let connection = broker.connection().await?;
    let lookup = Lookup::read(&connection, topology, campaign).await?;
    let Some(created) = &lookup.created else {
        return Ok(false);
    };
    let first = created.events_offset;
    let mut feed = EventFeed::open(&connection, topology, Offset::At(first)).await?;
    let whose = format!("campaign {campaign}");
    let gone = Gone {
        whose: &whose,
        topology,
    };
    let end = lookup.ended.as_ref().map(|e| e.events_offset);
    feed.catch_up(&connection, Some((first, gone)), end, |_, event| {
        if event.campaign == campaign {
            each(&event);
        }
    })
    .await?;
    Ok(true)
}

/// A campaign as the events stream tells it now, every device included
/// (`report`, `--retry-failed-from`). Phase `New` if there is no such
/// campaign.
pub async fn read_campaign(
    broker: &Broker,
    topology: &Topology,
    campaign: &str,
) -> Result<CampaignState, ProducerError> {
    let mut state = CampaignState::new(campaign);
    read_events(broker, topology, campaign, |event| state.apply(event)).await?;
    Ok(state)
}

/// A campaign's counts, phase and decisions now, as cheaply as they can be
/// had: a running one's newest snapshot and the events after it; an ended
/// campaign's final catalogue entry; else its events from its start. With the feed
/// the events were read from, positioned at the end, to follow (`None`
/// once the campaign has ended or if it is unknown).
pub async fn read_status(
    broker: &Broker,
    topology: &Topology,
    campaign: &str,
) -> Result<(CampaignState, Option<EventFeed>), ProducerError> {
    let connection = broker.connection().await?;
    // A running campaign's newest snapshot needs no catalogue lookup.
    let recent = Recent::read(&connection, topology, campaign).await?;
    debug!(
        snapshot_covers = ?recent.campaign.as_ref().map(|(covers, _)| covers),
        "read the recent snapshots"
    );
    let (mut state, from, expect) = match recent.campaign {
        // Its controller's last word: nothing after it changes the counts.
        Some((_, snapshot)) if snapshot.phase() == Phase::Completed => {
            return Ok((CampaignState::from_snapshot(snapshot), None));
        }
        Some((covers, snapshot)) => (CampaignState::from_snapshot(snapshot), covers + 1, None),
        None => {
            let lookup = Lookup::read(&connection, topology, campaign).await?;
            if let Some(ended) = lookup.ended {
                return Ok((CampaignState::from_snapshot(ended.snapshot), None));
            }
            let Some(created) = lookup.created else {
                // Either no campaign by that name, or no Flotilla under this
                // prefix at all; attaching to the events stream fails with a
                // 404 naming it in the second case.
                EventFeed::open(&connection, topology, Offset::Next).await?;
                return Ok((CampaignState::new(campaign), None));
            };
            let first = created.events_offset;
            (CampaignState::new(campaign), first, Some(first))
        }
    };
    let whose = format!("campaign {campaign}");
    let mut feed = EventFeed::open(&connection, topology, Offset::At(from)).await?;
    let expect = expect.map(|first| {
        (
            first,
            Gone {
                whose: &whose,
                topology,
            },
        )
    });
    let mut read = 0_u64;
    let end = feed
        .catch_up(&connection, expect, None, |_, event| {
            read += 1;
            state.apply(&event);
        })
        .await?;
    debug!(from, ?end, read, "read the events after the snapshot");
    // The feed's channel keeps the pooled connection open after the
    // handle returns to the pool.
    Ok((state, Some(feed)))
}

/// Reads the campaign's events from the start of the stream until `done`
/// says so, calling `progress` after each event of the campaign. Fails if
/// no event arrives for `quiet_limit`. For tests and the demo, whose
/// topologies are their own.
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
    let mut feed = EventFeed::open(&connection, topology, Offset::First).await?;
    loop {
        let (_, event) = tokio::time::timeout(quiet_limit, feed.next())
            .await
            .map_err(|_| FollowError::Quiet(quiet_limit))??;
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
