//! Where to start reading a campaign, so that no reader replays the whole
//! events stream.
//!
//! Two small streams beside the events stream:
//!
//! - `<prefix>.campaigns`, the catalogue: a `created` entry per campaign
//!   with the events-stream offset before its first event (written before
//!   its `started` decision), and an `ended` entry with the offset of its
//!   `completed` decision and its final state. A handful of records per
//!   campaign (and a marker per lookup that is not served by a
//!   snapshot), read from its start to a marker.
//! - `<prefix>.snapshots`: every running controller's campaign state each
//!   second (or every few seconds when nothing changes), with the events
//!   offset it covers, and, for campaigns with concurrency caps, the shared
//!   cap ledger. Readers attach a few seconds back by timestamp, take the
//!   newest, and read the events after it.
//!
//! So `status` and the control commands cost a snapshot and a second of
//! events; `report`, `history`, a resumed controller and a retry cost the
//! campaign's own span of the events stream, nothing before it.

use crate::state::Snapshot;
use chrono::{DateTime, Utc};
use flotilla_common::{
    BrokerError, Message, Publisher, Topology,
    stream::{Marker, Offset, StreamReader},
};
use lapin::Connection;
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, time::Duration};
use tracing::warn;

/// The AMQP `type` of a catalogue entry.
const ENTRY_MESSAGE_TYPE: &str = "flotilla.catalogue.v1";
/// The AMQP `type` of a campaign snapshot.
const SNAPSHOT_MESSAGE_TYPE: &str = "flotilla.snapshot.v1";
/// The AMQP `type` of a cap-ledger snapshot.
const LEDGER_MESSAGE_TYPE: &str = "flotilla.ledger.v1";
/// Which campaign a snapshot is of.
const CAMPAIGN_HEADER: &str = "x-flotilla-campaign";
/// The events offset a snapshot covers (every event up to and including it).
const COVERS_HEADER: &str = "x-flotilla-covers";

/// A controller writes a snapshot this often while its campaign changes...
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// ...and at least this often when it does not, so readers find one.
pub const SNAPSHOT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How far back readers look for snapshots: two heartbeats and a margin
/// (attaching by timestamp has a chunk's precision, a second's at worst).
const SNAPSHOT_LOOKBACK: Duration = Duration::from_secs(12);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
enum Entry<Id = String> {
    Created(Created),
    Ended(Box<Ended<Id>>),
}

/// A campaign's first entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    pub campaign: String,
    pub at: DateTime<Utc>,
    /// Every event of the campaign is at a higher offset than this one.
    pub events_offset: u64,
    /// Whether it claims room behind shared concurrency caps.
    pub capped: bool,
}

/// A campaign's last entry, written once its `completed` decision is in
/// the events stream. `Id` as in [`Snapshot`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ended<Id = String> {
    pub campaign: String,
    pub at: DateTime<Utc>,
    /// The offset of the `completed` decision.
    pub events_offset: u64,
    pub snapshot: Snapshot<Id>,
}

/// What the catalogue says about one campaign, and where every capped
/// campaign's events begin and end (for the cap ledger).
#[derive(Debug, Default)]
pub struct Lookup {
    pub created: Option<Created>,
    pub ended: Option<Ended>,
    /// Capped campaigns: first offset, and `completed` offset once ended.
    capped: HashMap<String, (u64, Option<u64>)>,
}

impl Lookup {
    /// Reads the catalogue to its end for `campaign`.
    pub async fn read(
        connection: &Connection,
        topology: &Topology,
        campaign: &str,
    ) -> Result<Lookup, BrokerError> {
        let mut lookup = Lookup::default();
        let read = read_to_end(connection, &topology.campaigns(), |record| {
            match record.decode::<Entry>() {
                Ok(Entry::Created(created)) => {
                    if created.capped {
                        lookup
                            .capped
                            .entry(created.campaign.clone())
                            .or_insert((created.events_offset, None));
                    }
                    // A controller that crashed before its `started`
                    // decision writes `created` again; the first counts.
                    if created.campaign == campaign && lookup.created.is_none() {
                        lookup.created = Some(created);
                    }
                }
                Ok(Entry::Ended(ended)) => {
                    if let Some(span) = lookup.capped.get_mut(&ended.campaign) {
                        span.1 = Some(ended.events_offset);
                    }
                    if ended.campaign == campaign {
                        lookup.ended = Some(*ended);
                    }
                }
                Err(error) => {
                    warn!(offset = ?record.offset, %error, "skipping a catalogue entry this build cannot read")
                }
            }
        })
        .await;
        match read {
            // A broker no controller of this version has declared the
            // catalogue on knows no campaign yet.
            Err(error) if is_not_found(&error) => Ok(Lookup::default()),
            read => read.map(|()| lookup),
        }
    }

    /// Where to start folding the events stream into an empty cap ledger so
    /// that it comes out exact: an offset at which no capped campaign had a
    /// device in flight, i.e. before the start of every capped campaign that
    /// had not ended by then. `None`: no capped campaign holds room, start
    /// empty at the end of the stream.
    pub fn ledger_start(&self) -> Option<u64> {
        let mut start: Option<u64> = None;
        loop {
            let earliest = self
                .capped
                .values()
                .filter(|(_, end)| match (end, start) {
                    (None, _) => true,
                    (Some(end), Some(start)) => *end >= start,
                    (Some(_), None) => false,
                })
                .map(|(first, _)| *first)
                .min();
            match (earliest, start) {
                (Some(earliest), Some(current)) if earliest >= current => return start,
                (Some(earliest), _) => start = Some(earliest),
                (None, _) => return start,
            }
        }
    }
}

/// Appends a catalogue entry, confirmed.
async fn append(
    publisher: &Publisher,
    topology: &Topology,
    entry: &Entry<&str>,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(entry).expect("a catalogue entry serializes to JSON");
    publisher
        .publish(
            &topology.campaigns(),
            &body,
            Message::new(ENTRY_MESSAGE_TYPE),
        )
        .await
}

pub async fn record_created(
    publisher: &Publisher,
    topology: &Topology,
    created: Created,
) -> Result<(), BrokerError> {
    append(publisher, topology, &Entry::Created(created)).await
}

pub async fn record_ended(
    publisher: &Publisher,
    topology: &Topology,
    ended: Ended<&str>,
) -> Result<(), BrokerError> {
    append(publisher, topology, &Entry::Ended(Box::new(ended))).await
}

/// In-flight devices behind capped targets, across campaigns, as of one
/// events offset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// Campaign, device, and the target keys it holds room behind.
    pub held: Vec<(String, String, Vec<String>)>,
}

/// Appends a campaign snapshot covering the events up to `covers`.
pub async fn write_snapshot(
    publisher: &Publisher,
    topology: &Topology,
    covers: u64,
    snapshot: &Snapshot<&str>,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(snapshot).expect("a snapshot serializes to JSON");
    let message = Message::new(SNAPSHOT_MESSAGE_TYPE)
        .header(CAMPAIGN_HEADER, snapshot.campaign.as_str())
        .header(COVERS_HEADER, covers as i64);
    publisher
        .publish(&topology.snapshots(), &body, message)
        .await
}

/// Appends the cap ledger covering the events up to `covers`.
pub async fn write_ledger(
    publisher: &Publisher,
    topology: &Topology,
    covers: u64,
    ledger: &LedgerSnapshot,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(ledger).expect("a ledger snapshot serializes to JSON");
    let message = Message::new(LEDGER_MESSAGE_TYPE).header(COVERS_HEADER, covers as i64);
    publisher
        .publish(&topology.snapshots(), &body, message)
        .await
}

/// The newest snapshots of the last few seconds.
#[derive(Debug, Default)]
pub struct Recent {
    /// The campaign's newest snapshot and the offset it covers.
    pub campaign: Option<(u64, Snapshot)>,
    /// The newest cap ledger and the offset it covers.
    pub ledger: Option<(u64, LedgerSnapshot)>,
}

impl Recent {
    /// Reads the snapshots written in the last few seconds, keeping the
    /// newest of `campaign` and the newest ledger. Only those two are
    /// decoded.
    pub async fn read(
        connection: &Connection,
        topology: &Topology,
        campaign: &str,
    ) -> Result<Recent, BrokerError> {
        let since = Utc::now()
            - chrono::Duration::from_std(SNAPSHOT_LOOKBACK).expect("the lookback is small");
        let mut reader =
            match StreamReader::open(connection, &topology.snapshots(), Offset::Since(since)).await
            {
                Err(error) if is_not_found(&error) => return Ok(Recent::default()),
                reader => reader?,
            };
        let marker = Marker::publish(connection, &topology.snapshots()).await?;
        let mut newest_campaign = None;
        let mut newest_ledger = None;
        reader
            .read_to(&marker, |record| {
                let Some(covers) = record
                    .header_int(COVERS_HEADER)
                    .and_then(|c| u64::try_from(c).ok())
                else {
                    return;
                };
                match record.kind.as_deref() {
                    Some(SNAPSHOT_MESSAGE_TYPE)
                        if record.header_text(CAMPAIGN_HEADER).as_deref() == Some(campaign)
                            && newest_campaign.as_ref().is_none_or(|(c, _)| covers >= *c) =>
                    {
                        newest_campaign = Some((covers, record));
                    }
                    Some(LEDGER_MESSAGE_TYPE)
                        if newest_ledger.as_ref().is_none_or(|(c, _)| covers >= *c) =>
                    {
                        newest_ledger = Some((covers, record));
                    }
                    _ => {}
                }
            })
            .await?;
        Ok(Recent {
            campaign: decode_newest(newest_campaign, "campaign"),
            ledger: decode_newest(newest_ledger, "ledger"),
        })
    }
}

/// Reads a stream from its start to a marker of this reader's own.
async fn read_to_end(
    connection: &Connection,
    stream: &str,
    each: impl FnMut(flotilla_common::stream::Record),
) -> Result<(), BrokerError> {
    let mut reader = StreamReader::open(connection, stream, Offset::First).await?;
    let marker = Marker::publish(connection, stream).await?;
    reader.read_to(&marker, each).await?;
    Ok(())
}

/// The broker has no such queue.
fn is_not_found(error: &BrokerError) -> bool {
    matches!(error, BrokerError::Amqp(error)
        if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404))
}

fn decode_newest<T: serde::de::DeserializeOwned>(
    found: Option<(u64, flotilla_common::stream::Record)>,
    what: &str,
) -> Option<(u64, T)> {
    let (covers, record) = found?;
    match record.decode() {
        Ok(value) => Some((covers, value)),
        Err(error) => {
            warn!(%error, "skipping a {what} snapshot this build cannot read");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(spans: &[(&str, u64, Option<u64>)]) -> Lookup {
        Lookup {
            capped: spans
                .iter()
                .map(|(c, first, end)| ((*c).to_owned(), (*first, *end)))
                .collect(),
            ..Lookup::default()
        }
    }

    #[test]
    fn the_ledger_starts_before_every_capped_campaign_in_flight_then() {
        // None capped, or all ended: nothing holds room.
        assert_eq!(lookup(&[]).ledger_start(), None);
        assert_eq!(lookup(&[("a", 10, Some(20))]).ledger_start(), None);
        // b runs from 30; a ended before it started.
        assert_eq!(
            lookup(&[("a", 10, Some(20)), ("b", 30, None)]).ledger_start(),
            Some(30)
        );
        // a was still in flight when b started, so its claims count too.
        assert_eq!(
            lookup(&[("a", 10, Some(40)), ("b", 30, None)]).ledger_start(),
            Some(10)
        );
        // ...and so do those of c, in flight when a started.
        assert_eq!(
            lookup(&[("c", 5, Some(12)), ("a", 10, Some(40)), ("b", 30, None)]).ledger_start(),
            Some(5)
        );
    }
}
