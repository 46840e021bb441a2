//! AMQP headers Flotilla reads and writes: message metadata that is not part
//! of a job's body.

use lapin::types::{AMQPValue, FieldTable, LongString};

/// When a delayed job is due, in Unix milliseconds. A job that comes back
/// from a delay tier early waits again; one that comes back late shows how
/// late in the poll-lateness metric.
pub const DUE_AT_MS: &str = "x-flotilla-due-ms";
/// Why a message was dead-lettered.
pub const DEAD_REASON: &str = "x-flotilla-dead-reason";
/// What exactly was wrong with a dead-lettered message.
pub const DEAD_DETAIL: &str = "x-flotilla-dead-detail";
/// The queue a dead-lettered message was taken from.
pub const DEAD_FROM: &str = "x-flotilla-dead-from";
/// How often workers returned a job to the queue by republishing it (after
/// a panicking step), counted by the workers themselves: RabbitMQ 4.3 no
/// longer counts a `nack` toward the delivery limit.
pub const RETURNS: &str = "x-flotilla-returns";
/// How often the broker redelivered a message, set by quorum queues.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// A fresh id on every publish of a job message (see
/// [`crate::Message`]): one hop of a job, however often it is redelivered.
pub const HOP: &str = "x-flotilla-hop";
/// On a hand-off's record in the handoffs stream: the hop of the delivery
/// it hands off, so a redelivery of that delivery is known as done.
pub const AFTER_HOP: &str = "x-flotilla-after-hop";
/// RabbitMQ's sender-selected distribution: more queues for one publish.
pub const CC: &str = "CC";
/// W3C trace context, so one device's rollout is one trace.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A header value of one of the two types Flotilla uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

pub fn set(table: &mut FieldTable, name: &str, value: impl Into<Value>) {
    let value = match value.into() {
        Value::Int(i) => AMQPValue::LongLongInt(i),
        Value::Text(s) => AMQPValue::LongString(LongString::from(s)),
    };
    table.insert(name.into(), value);
}

/// Removes the headers `names` from `table`.
pub fn remove(table: &mut FieldTable, names: &[&str]) {
    let mut map = table.inner().clone();
    for name in names {
        map.remove(*name);
    }
    *table = map.into();
}

pub fn get_int(table: Option<&FieldTable>, name: &str) -> Option<i64> {
    match table?.inner().get(name)? {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        AMQPValue::Timestamp(i) => i64::try_from(*i).ok(),
        _ => None,
    }
}

pub fn get_text(table: Option<&FieldTable>, name: &str) -> Option<String> {
    match table?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The hops of the deliveries a hand-off record names (its
/// [`AFTER_HOP`]): one, or several separated by spaces when a lane's
/// events record hands off a whole round. Text, not an array: a stream
/// keeps only headers of simple types.
pub fn join_hops(hops: &[&str]) -> String {
    hops.join(" ")
}

/// The hops of a hand-off record's [`AFTER_HOP`] (see [`join_hops`]).
pub fn split_hops(text: &str) -> impl Iterator<Item = &str> {
    text.split(' ').filter(|hop| !hop.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_joined_split_back() {
        let joined = join_hops(&["h1", "h2"]);
        assert_eq!(split_hops(&joined).collect::<Vec<_>>(), ["h1", "h2"]);
        assert_eq!(split_hops(&join_hops(&["h1"])).collect::<Vec<_>>(), ["h1"]);
        assert_eq!(split_hops("").count(), 0);
    }

    #[test]
    fn values_read_back_as_written() {
        let mut table = FieldTable::default();
        set(&mut table, DUE_AT_MS, 1_700_000_000_123);
        set(&mut table, DEAD_REASON, "undecodable");
        assert_eq!(get_int(Some(&table), DUE_AT_MS), Some(1_700_000_000_123));
        assert_eq!(
            get_text(Some(&table), DEAD_REASON).as_deref(),
            Some("undecodable")
        );
        assert_eq!(get_text(Some(&table), "missing"), None);
        assert_eq!(get_int(None, DUE_AT_MS), None);
        remove(&mut table, &[DUE_AT_MS, RETURNS]);
        assert_eq!(get_int(Some(&table), DUE_AT_MS), None);
        assert!(get_text(Some(&table), DEAD_REASON).is_some());
    }
}
