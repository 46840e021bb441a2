//! Reading a stream (events, control, the campaign catalogue) from a chosen
//! offset, and knowing exactly when everything written before now is read.
//!
//! A stream keeps its records after they are read; acking a delivery only
//! returns credit to the broker, so readers ack everything they receive
//! (several at once: one ack per record halves a reader's speed).
//!
//! "Caught up" is a fact, not a quiet gap: a reader publishes a [`Marker`]
//! of its own to the stream it reads and reads until the marker comes back.
//! Everything confirmed before the marker was published is at a lower offset,
//! so it has been read. Markers are records of their own AMQP type; every
//! reader skips them, its own included, unless it asks for them.

use crate::{
    BrokerError, Message, Publisher,
    event::{Event, EventRecord},
    headers,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::{
    Acker, Channel, Connection, Consumer,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use serde::de::DeserializeOwned;
use std::pin::Pin;

/// Unacked records in flight to one reader; streams require a prefetch.
const STREAM_PREFETCH: u16 = 2000;
/// Records acked at once (`multiple`), well under the prefetch so the broker
/// never runs out of credit.
const ACK_EVERY: u32 = 250;

/// The AMQP `type` of a marker record.
pub const MARKER_MESSAGE_TYPE: &str = "flotilla.marker.v1";
/// The header naming a marker.
const MARKER_ID: &str = "x-flotilla-marker";

/// Where a reader starts.
#[derive(Debug, Clone, Copy)]
pub enum Offset {
    /// The oldest record still kept.
    First,
    /// Only records appended after the reader attaches.
    Next,
    /// The record at this offset and after.
    At(u64),
    /// Records appended at or after this time (to a chunk's precision).
    Since(DateTime<Utc>),
}

impl Offset {
    fn to_argument(self) -> AMQPValue {
        match self {
            Offset::First => AMQPValue::LongString(LongString::from("first")),
            Offset::Next => AMQPValue::LongString(LongString::from("next")),
            Offset::At(offset) => AMQPValue::LongLongInt(offset as i64),
            Offset::Since(at) => AMQPValue::Timestamp(at.timestamp().max(0) as u64),
        }
    }
}

/// One record read from a stream.
#[derive(Debug)]
pub struct Record {
    /// The record's position in the stream.
    pub offset: Option<u64>,
    /// The record's AMQP `type`.
    pub kind: Option<String>,
    pub headers: Option<FieldTable>,
    pub body: Vec<u8>,
}

impl Record {
    /// The body as one value (a snapshot, a command). Read an events
    /// stream's records with [`Record::events`]: one may hold several.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The events of a record of the events stream, in order (see
    /// [`EventRecord`]).
    pub fn events(&self) -> Result<Vec<Event>, serde_json::Error> {
        EventRecord::decode(self.kind.as_deref(), &self.body)
    }

    /// The id of the marker this record is, if it is one.
    pub fn marker(&self) -> Option<String> {
        if self.kind.as_deref() != Some(MARKER_MESSAGE_TYPE) {
            return None;
        }
        headers::get_text(self.headers.as_ref(), MARKER_ID)
    }

    pub fn header_text(&self, name: &str) -> Option<String> {
        headers::get_text(self.headers.as_ref(), name)
    }

    pub fn header_int(&self, name: &str) -> Option<i64> {
        headers::get_int(self.headers.as_ref(), name)
    }
}

/// The ack of the records handed out so far, still to be sent.
type PendingAck = Pin<Box<dyn Future<Output = lapin::Result<bool>> + Send>>;

pub struct StreamReader {
    // Kept so the consumer's channel lives as long as the reader.
    _channel: Channel,
    consumer: Consumer,
    stream: String,
    pending_ack: Option<PendingAck>,
    /// Records handed out since the last ack, and the last one's acker.
    unacked: u32,
    last: Option<Acker>,
}

impl StreamReader {
    pub async fn open(
        connection: &Connection,
        stream: &str,
        offset: Offset,
    ) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(STREAM_PREFETCH, BasicQosOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), offset.to_argument());
        let consumer = channel
            .basic_consume(
                stream.into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await?;
        Ok(StreamReader {
            _channel: channel,
            consumer,
            stream: stream.to_owned(),
            pending_ack: None,
            unacked: 0,
            last: None,
        })
    }

    /// The stream this reader reads.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The next record that is not a marker, waiting for one to be appended
    /// if need be. `None` once the consumer is cancelled or its connection
    /// is gone.
    pub async fn next(&mut self) -> Option<Result<Record, BrokerError>> {
        loop {
            match self.next_any().await? {
                Ok(record) if record.marker().is_some() => continue,
                other => return Some(other),
            }
        }
    }

    /// The next record, markers included.
    pub async fn next_any(&mut self) -> Option<Result<Record, BrokerError>> {
        // Cancel-safe, as `select!` loops need: the record is returned as
        // soon as it arrives and its ack is sent on a later call, so a
        // dropped call loses neither a record nor a credit.
        loop {
            if let Some(ack) = self.pending_ack.as_mut() {
                let acked = ack.await;
                self.pending_ack = None;
                if let Err(error) = acked {
                    return Some(Err(error.into()));
                }
            }
            match self.last.take() {
                Some(acker) if self.unacked >= ACK_EVERY => {
                    self.unacked = 0;
                    self.pending_ack = Some(Box::pin(async move {
                        acker.ack(BasicAckOptions { multiple: true }).await
                    }));
                }
                last => {
                    self.last = last;
                    break;
                }
            }
        }
        let delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error.into())),
        };
        self.unacked += 1;
        self.last = Some(delivery.acker.clone());
        let headers = delivery.properties.headers().clone();
        let offset = headers::get_int(headers.as_ref(), "x-stream-offset")
            .and_then(|o| u64::try_from(o).ok());
        Some(Ok(Record {
            offset,
            kind: delivery.properties.kind().as_ref().map(|k| k.to_string()),
            headers,
            body: delivery.data,
        }))
    }

    /// Reads until `marker` comes back, handing every other record (markers
    /// of other readers skipped) to `each`. Returns the marker's offset.
    pub async fn read_to(
        &mut self,
        marker: &Marker,
        mut each: impl FnMut(Record),
    ) -> Result<Option<u64>, BrokerError> {
        loop {
            let record = self.next_any().await.ok_or(BrokerError::ConnectionLost)??;
            match record.marker() {
                Some(id) if id == marker.id => return Ok(record.offset),
                Some(_) => {}
                None => each(record),
            }
        }
    }
}

/// Where a stream begins and ends now: the offset of its oldest record, and
/// that of a marker appended for the purpose (every record confirmed before
/// the call is below it). Offsets are consecutive, so a record at an offset
/// in between is still there.
pub async fn bounds(connection: &Connection, stream: &str) -> Result<(u64, u64), BrokerError> {
    let mut tail = StreamReader::open(connection, stream, Offset::Next).await?;
    let marker = Marker::publish(connection, stream).await?;
    let end = tail
        .read_to(&marker, |_| {})
        .await?
        .ok_or(BrokerError::ConnectionLost)?;
    // The stream holds the marker at least, so its oldest record comes.
    let channel = connection.create_channel().await?;
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), Offset::First.to_argument());
    let mut consumer = channel
        .basic_consume(
            stream.into(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await?;
    let oldest = consumer.next().await.ok_or(BrokerError::ConnectionLost)??;
    let _ = channel.close(200, "found the oldest record".into()).await;
    let oldest = headers::get_int(oldest.properties.headers().as_ref(), "x-stream-offset")
        .and_then(|o| u64::try_from(o).ok())
        .ok_or(BrokerError::ConnectionLost)?;
    Ok((oldest, end))
}

/// A record a reader appends to learn when it has read everything before it.
#[derive(Debug, Clone)]
pub struct Marker {
    id: String,
}

impl Marker {
    /// Appends a new marker to `stream`, confirmed. Publish it after the
    /// reader that waits for it has attached: one attached at `Next` would
    /// otherwise miss it.
    pub async fn publish(connection: &Connection, stream: &str) -> Result<Marker, BrokerError> {
        let id = uuid::Uuid::new_v4().to_string();
        let publisher = Publisher::open(connection).await?;
        publisher
            .publish(
                stream,
                b"{}",
                Message::new(MARKER_MESSAGE_TYPE).header(MARKER_ID, id.as_str()),
            )
            .await?;
        Ok(Marker { id })
    }

    /// Whether a record's marker id is this marker's.
    pub fn is(&self, id: &str) -> bool {
        self.id == id
    }
}
