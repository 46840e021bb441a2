//! Recognising a redelivered step that was already handed off.
//!
//! A worker that dies after its hand-off is committed but before the ack
//! leaves the delivery to be redelivered. Running its step again would act
//! on the device twice (a DMS rule cannot be read back, so it looks undone)
//! and start a second chain of the job. So the first message of every
//! hand-off is also appended, in the same publish, to the handoffs stream
//! with the hop of the delivery it hands off (see
//! [`flotilla_common::Message::hands_off`]); a redelivered delivery whose hop
//! is found there is dropped. A hand-off that sends no job has its lane
//! round's events record for its record, which names the hops of every
//! such delivery of the round.
//!
//! Only redeliveries are looked up, and lookups waiting at once share one
//! read of the stream: a dead worker's deliveries all come back together.

use chrono::{DateTime, Utc};
use flotilla_common::{
    BrokerError, headers,
    stream::{Marker, Offset, StreamReader},
};
use lapin::Connection;
use std::collections::HashSet;
use tokio::{
    sync::{mpsc, oneshot},
    time::timeout,
};
use tracing::debug;

/// Broker and worker clocks differ a little; a read starts this much
/// before the redelivered message was published.
const CLOCK_MARGIN: chrono::Duration = chrono::Duration::seconds(5);
/// A read that gets nothing for this long, not even its own marker, is
/// stuck (a stream member restarting under it can leave a consumer that
/// never delivers): it fails, and with it the session, whose next
/// connection reads again. A read that moves is never cut short, however
/// much of the stream it reads.
const READ_STALL: std::time::Duration = std::time::Duration::from_secs(15);
/// Lookups waiting for the read under way, at most.
const QUEUED_LOOKUPS: usize = 1024;

/// One redelivered delivery to look up.
struct Lookup {
    hop: String,
    /// Its hand-off, if any, is no older than this.
    since: DateTime<Utc>,
    answer: oneshot::Sender<Result<bool, BrokerError>>,
}

/// The slots' handle on the session's [`Reads`].
#[derive(Clone)]
pub(crate) struct Fence {
    lookups: mpsc::Sender<Lookup>,
}

/// Reads the handoffs stream for the lookups the slots send; runs as long
/// as the session.
pub(crate) struct Reads {
    lookups: mpsc::Receiver<Lookup>,
    stream: String,
}

pub(crate) fn new(stream: String) -> (Fence, Reads) {
    let (sender, receiver) = mpsc::channel(QUEUED_LOOKUPS);
    (
        Fence { lookups: sender },
        Reads {
            lookups: receiver,
            stream,
        },
    )
}

impl Fence {
    /// Whether the delivery with `hop`, published at `published`, was
    /// handed off already. An error means the stream could not be read;
    /// the delivery then goes back to the queue like a failed hand-off.
    pub(crate) async fn handed_off(
        &self,
        hop: &str,
        published: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        let (answer, answered) = oneshot::channel();
        let lookup = Lookup {
            hop: hop.to_owned(),
            since: published - CLOCK_MARGIN,
            answer,
        };
        self.lookups
            .send(lookup)
            .await
            .map_err(|_| BrokerError::ConnectionLost)?;
        answered.await.map_err(|_| BrokerError::ConnectionLost)?
    }
}

impl Reads {
    /// Answers lookups until every [`Fence`] handle is gone: each read
    /// takes all the lookups waiting, from the oldest `since` among them
    /// to a marker of its own, so it sees every hand-off confirmed before
    /// it began.
    pub(crate) async fn serve(mut self, connection: &Connection) {
        while let Some(first) = self.lookups.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = self.lookups.try_recv() {
                batch.push(more);
            }
            let since = batch
                .iter()
                .map(|lookup| lookup.since)
                .min()
                .expect("a batch holds its first lookup");
            let wanted: HashSet<String> = batch.iter().map(|l| l.hop.clone()).collect();
            let found = read(connection, &self.stream, since, &wanted).await;
            debug!(lookups = batch.len(), found = ?found.as_ref().map(HashSet::len), "read the handoffs stream");
            for lookup in batch {
                let answer = match &found {
                    Ok(found) => Ok(found.contains(&lookup.hop)),
                    Err(error) => Err(BrokerError::Read {
                        stream: self.stream.clone(),
                        reason: error.to_string(),
                    }),
                };
                let _ = lookup.answer.send(answer);
            }
        }
    }
}

/// The hops among `wanted` that the handoffs stream records from `since`
/// to now.
async fn read(
    connection: &Connection,
    stream: &str,
    since: DateTime<Utc>,
    wanted: &HashSet<String>,
) -> Result<HashSet<String>, BrokerError> {
    let stalled = || BrokerError::Read {
        stream: stream.to_owned(),
        reason: format!("nothing came for {READ_STALL:?}"),
    };
    let mut reader = timeout(
        READ_STALL,
        StreamReader::open(connection, stream, Offset::Since(since)),
    )
    .await
    .map_err(|_| stalled())??;
    let marker = timeout(READ_STALL, Marker::publish(connection, stream))
        .await
        .map_err(|_| stalled())??;
    let mut found = HashSet::new();
    loop {
        let record = timeout(READ_STALL, reader.next_any())
            .await
            .map_err(|_| stalled())?
            .ok_or(BrokerError::ConnectionLost)??;
        match record.marker() {
            Some(id) if marker.is(&id) => return Ok(found),
            Some(_) => {}
            None => {
                if let Some(after) = record.header_text(headers::AFTER_HOP) {
                    // A lane's events record hands off a whole round.
                    found.extend(
                        headers::split_hops(&after)
                            .filter(|hop| wanted.contains(*hop))
                            .map(str::to_owned),
                    );
                }
            }
        }
    }
}
