//! Reading a stream (events, control) from a chosen offset.
//!
//! A stream keeps its records after they are read; acking a delivery only
//! returns credit to the broker, so readers ack everything they receive.

use crate::BrokerError;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::{
    Channel, Connection, Consumer,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use serde::de::DeserializeOwned;
use std::pin::Pin;

/// Unacked records in flight to one reader; streams require a prefetch.
const STREAM_PREFETCH: u16 = 500;

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
    pub body: Vec<u8>,
}

impl Record {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// The ack of the record handed out last, still to be sent.
type PendingAck = Pin<Box<dyn Future<Output = lapin::Result<bool>> + Send>>;

pub struct StreamReader {
    // Kept so the consumer's channel lives as long as the reader.
    _channel: Channel,
    consumer: Consumer,
    pending_ack: Option<PendingAck>,
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
            pending_ack: None,
        })
    }

    /// The next record, waiting for one to be appended if need be. `None`
    /// once the consumer is cancelled or its connection is gone.
    pub async fn next(&mut self) -> Option<Result<Record, BrokerError>> {
        // Cancel-safe, as `select!` loops need: the record is returned as
        // soon as it arrives and its ack is sent on the next call, so a
        // dropped call loses neither a record nor a credit.
        if let Some(ack) = self.pending_ack.as_mut() {
            let acked = ack.await;
            self.pending_ack = None;
            if let Err(error) = acked {
                return Some(Err(error.into()));
            }
        }
        let delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error.into())),
        };
        let acker = delivery.acker.clone();
        self.pending_ack = Some(Box::pin(async move {
            acker.ack(BasicAckOptions::default()).await
        }));
        let offset =
            crate::headers::get_int(delivery.properties.headers().as_ref(), "x-stream-offset")
                .and_then(|o| u64::try_from(o).ok());
        Some(Ok(Record {
            offset,
            body: delivery.data,
        }))
    }
}
