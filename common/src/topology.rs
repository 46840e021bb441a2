//! The RabbitMQ topology, declared idempotently by every process at start.
//!
//! | queue | type | purpose |
//! |---|---|---|
//! | `<prefix>.jobs` | quorum | the work; a delivery limit sends a message that keeps crashing workers to `dead` |
//! | `<prefix>.delay.<tier>` | quorum, one TTL each | delayed re-enqueue: expired messages dead-letter back to `jobs` |
//! | `<prefix>.events` | stream | every step and outcome; the source of truth for progress |
//! | `<prefix>.control` | stream | campaign commands (pause, resume, cancel) |
//! | `<prefix>.campaigns` | stream | the catalogue: where each campaign's events begin and end |
//! | `<prefix>.snapshots` | stream | each running campaign's state every second, kept briefly |
//! | `<prefix>.handoffs` | stream | a copy of each step's hand-off, kept briefly, so a redelivered step that was handed off is dropped |
//! | `<prefix>.dead` | quorum | messages that cannot be processed, with the reason; never dropped |
//!
//! Everything is published through the default exchange straight to a queue
//! name, so there are no exchanges or bindings to keep consistent.
//!
//! Dead-lettering is `at-least-once` (which RabbitMQ only allows with
//! `x-overflow: reject-publish`): without it the broker re-publishes dead
//! letters unconfirmed and can lose them. One TTL per delay queue, because a
//! message TTL only expires at the head of a queue, so mixed delays in one
//! queue would block each other. Every argument here is accepted by
//! RabbitMQ 3.10 through 4.x.

use crate::{Broker, BrokerError};
use lapin::{
    Channel, Connection, ErrorKind,
    options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use std::time::Duration;

/// The default name prefix; tests and demos use their own to stay apart.
pub const DEFAULT_PREFIX: &str = "flotilla";

/// How often a job may be delivered before the broker gives up on it and
/// dead-letters it (a message that crashes every worker that takes it).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// How long the streams keep events and commands unless told otherwise
/// (`FLOTILLA_RETENTION`). A campaign must finish (and be reported on)
/// within it, since its state is rebuilt from the stream.
pub const DEFAULT_RETENTION: &str = "30D";
/// How long snapshots are kept: readers only want the newest few seconds.
const SNAPSHOT_MAX_AGE: &str = "1h";
/// Snapshot segments are small so that their age limit takes effect:
/// RabbitMQ only ever deletes whole segments (500 MB by default).
const SNAPSHOT_SEGMENT_BYTES: i64 = 8_000_000;
/// How long hand-off records are kept. A redelivery comes once the broker
/// notices its consumer gone (seconds), or when a worker next takes the
/// job after every worker was down; past this age a redelivered step runs
/// again, as it would without the fence (its driver observes first).
const HANDOFFS_MAX_AGE: &str = "1h";
/// And at most this much of them: a busy fleet writes a few MB a second.
const HANDOFFS_MAX_BYTES: i64 = 1_000_000_000;
const HANDOFFS_SEGMENT_BYTES: i64 = 16_000_000;
/// How long a new stream may take to elect its leader.
const STREAM_LEADER_WAIT: Duration = Duration::from_secs(10);

const DEFAULT_DELAY_TIERS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    /// Ascending, no duplicates.
    delay_tiers: Vec<Duration>,
    delivery_limit: u32,
    /// `x-max-age` of the events, control and campaigns streams.
    retention: Retention,
}

/// A stream retention in RabbitMQ's `x-max-age` syntax: a number and one of
/// `Y`, `M`, `D`, `h`, `m`, `s` (`30D`, `12h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention(String);

impl std::str::FromStr for Retention {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unit = text.chars().last().unwrap_or(' ');
        let number = &text[..text.len().saturating_sub(unit.len_utf8())];
        if !"YMDhms".contains(unit)
            || number.is_empty()
            || !number.bytes().all(|b| b.is_ascii_digit())
            || number.bytes().all(|b| b == b'0')
        {
            return Err(format!(
                "retention {text:?}: expected a number and a unit, one of Y, M, D, h, m, s (e.g. 30D)"
            ));
        }
        Ok(Retention(text.to_owned()))
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention(DEFAULT_RETENTION.to_owned())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "queue {queue} already exists with different arguments: {broker_says}. \
         Delete it (it must be empty) or use another prefix"
    )]
    Mismatch { queue: String, broker_says: String },
    #[error("declaring queue {queue}: {source}")]
    Broker {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("connecting to declare the queues: {0}")]
    Connect(#[from] BrokerError),
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
            delay_tiers: DEFAULT_DELAY_TIERS.to_vec(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            retention: Retention::default(),
        }
    }

    /// Sets how long new streams keep their records.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Replaces the delay tiers (tests use sub-second tiers to run fast).
    pub fn with_delay_tiers(mut self, mut tiers: Vec<Duration>) -> Self {
        tiers.retain(|t| !t.is_zero());
        tiers.sort();
        tiers.dedup();
        assert!(
            !tiers.is_empty(),
            "a topology needs at least one delay tier"
        );
        self.delay_tiers = tiers;
        self
    }

    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit;
        self
    }

    pub fn delivery_limit(&self) -> u32 {
        self.delivery_limit
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn jobs(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The catalogue: per campaign, where its events begin and end.
    pub fn campaigns(&self) -> String {
        format!("{}.campaigns", self.prefix)
    }

    /// Running campaigns' recent state, so a reader need not replay them.
    pub fn snapshots(&self) -> String {
        format!("{}.snapshots", self.prefix)
    }

    /// A copy of every hand-off, for the workers' fence against running a
    /// redelivered step again.
    pub fn handoffs(&self) -> String {
        format!("{}.handoffs", self.prefix)
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn delay_tiers(&self) -> &[Duration] {
        &self.delay_tiers
    }

    pub fn delay_queue(&self, tier: Duration) -> String {
        format!("{}.delay.{}", self.prefix, tier_name(tier))
    }

    /// The tier for a wanted delay: the longest one not longer than it (the
    /// shortest if all are longer). A job that comes back early is delayed
    /// again for the rest, so long waits cost a few hops, never lateness.
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.delay_tiers
            .iter()
            .rev()
            .find(|tier| **tier <= delay)
            .copied()
            .unwrap_or(self.delay_tiers[0])
    }

    /// Every queue, for declaring and for tearing a test's topology down.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![
            self.jobs(),
            self.dead(),
            self.events(),
            self.control(),
            self.campaigns(),
            self.snapshots(),
            self.handoffs(),
        ];
        names.extend(self.delay_tiers.iter().map(|t| self.delay_queue(*t)));
        names
    }

    /// Declares every queue. Safe to run from any number of processes; a
    /// queue that exists with other arguments is reported by name.
    pub async fn declare(&self, broker: &Broker) -> Result<(), TopologyError> {
        let connection = broker.connection().await?;
        // A failed declaration closes its channel; one channel for the whole
        // sequence is fine because we stop at the first failure.
        let channel =
            connection
                .create_channel()
                .await
                .map_err(|source| TopologyError::Broker {
                    queue: self.jobs(),
                    source,
                })?;
        let dead = self.dead();
        declare(&channel, &dead, quorum()).await?;

        let mut jobs = quorum();
        jobs.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        dead_letter_to(&mut jobs, &dead);
        declare(&channel, &self.jobs(), jobs).await?;

        for tier in &self.delay_tiers {
            let mut delay = quorum();
            delay.insert(
                "x-message-ttl".into(),
                AMQPValue::LongInt(tier.as_millis() as i32),
            );
            dead_letter_to(&mut delay, &self.jobs());
            declare(&channel, &self.delay_queue(*tier), delay).await?;
        }

        // Closing is a courtesy; the declarations are already done.
        let _ = channel.close(200, "declared".into()).await;
        let retention = self.retention.to_string();
        let kept_for = |max_age| StreamRetention {
            max_age,
            max_bytes: None,
            segment_bytes: None,
        };
        let streams = [
            (self.events(), kept_for(retention.as_str())),
            (self.control(), kept_for(retention.as_str())),
            (self.campaigns(), kept_for(retention.as_str())),
            (
                self.snapshots(),
                StreamRetention {
                    segment_bytes: Some(SNAPSHOT_SEGMENT_BYTES),
                    ..kept_for(SNAPSHOT_MAX_AGE)
                },
            ),
            (
                self.handoffs(),
                StreamRetention {
                    max_age: HANDOFFS_MAX_AGE,
                    max_bytes: Some(HANDOFFS_MAX_BYTES),
                    segment_bytes: Some(HANDOFFS_SEGMENT_BYTES),
                },
            ),
        ];
        for (stream, retention) in &streams {
            declare_stream(&connection, stream, retention).await?;
        }
        // Back to the pool before the waits take theirs from it: held, it
        // would make the pool open a second connection, kept for good (a
        // lapin connection's buffers are 8 MiB).
        drop(connection);
        for (stream, ..) in &streams {
            await_stream_leader(broker, stream).await?;
        }
        Ok(())
    }

    /// Deletes every queue of this topology (tests and demos clean up after
    /// themselves; production topology is never deleted by Flotilla).
    pub async fn delete(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let channel = connection.create_channel().await?;
        for name in self.queue_names() {
            channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn tier_name(tier: Duration) -> String {
    let ms = tier.as_millis();
    match ms {
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

fn long_string(value: &str) -> AMQPValue {
    // A ShortString here makes RabbitMQ drop the whole connection.
    AMQPValue::LongString(LongString::from(value))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args
}

fn dead_letter_to(args: &mut FieldTable, queue: &str) {
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(queue));
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    args.insert("x-overflow".into(), long_string("reject-publish"));
}

/// What a stream keeps. RabbitMQ only ever deletes whole segments (500 MB
/// by default), so a stream kept briefly has small ones.
struct StreamRetention<'a> {
    max_age: &'a str,
    max_bytes: Option<i64>,
    segment_bytes: Option<i64>,
}

/// Declares a stream unless it exists. An existing stream keeps the
/// retention it was created with: RabbitMQ refuses to declare a queue again
/// with other arguments, and processes started with an older or newer
/// retention setting must not fail for it (a policy changes it in place).
async fn declare_stream(
    connection: &Connection,
    stream: &str,
    retention: &StreamRetention<'_>,
) -> Result<(), TopologyError> {
    let broker_error = |source| TopologyError::Broker {
        queue: stream.to_owned(),
        source,
    };
    // A passive declaration of a missing queue closes its channel: one each.
    let probe = connection.create_channel().await.map_err(broker_error)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match probe
        .queue_declare(ShortString::from(stream), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = probe.close(200, "exists".into()).await;
            return Ok(());
        }
        Err(error) if matches!(error.kind(), ErrorKind::ProtocolError(e) if e.get_id() == 404) => {}
        Err(error) => return Err(broker_error(error)),
    }
    let channel = connection.create_channel().await.map_err(broker_error)?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("stream"));
    args.insert("x-max-age".into(), long_string(retention.max_age));
    if let Some(bytes) = retention.max_bytes {
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(bytes));
    }
    if let Some(bytes) = retention.segment_bytes {
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(bytes),
        );
    }
    declare(&channel, stream, args).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// A stream declared a moment ago has no leader yet, and until it has, the
/// broker refuses its readers (and can fail its writers). Waits, briefly,
/// until a reader can attach.
///
/// RabbitMQ refuses a reader that comes too soon by closing its whole
/// connection, not only its channel, so each attempt takes a connection
/// from the pool, which replaces one that was closed.
async fn await_stream_leader(broker: &Broker, stream: &str) -> Result<(), TopologyError> {
    let deadline = tokio::time::Instant::now() + STREAM_LEADER_WAIT;
    loop {
        let connection = broker.connection().await?;
        match attach_reader(&connection, stream).await {
            Ok(()) => return Ok(()),
            Err(source) if tokio::time::Instant::now() >= deadline => {
                return Err(TopologyError::Broker {
                    queue: stream.to_owned(),
                    source,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn attach_reader(connection: &Connection, stream: &str) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), long_string("next"));
    channel
        .basic_consume(
            ShortString::from(stream),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let _ = channel.close(200, "the stream has a leader".into()).await;
    Ok(())
}

async fn declare(channel: &Channel, queue: &str, args: FieldTable) -> Result<(), TopologyError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(ShortString::from(queue), options, args)
        .await
    {
        Ok(_) => Ok(()),
        Err(source) => Err(match source.kind() {
            ErrorKind::ProtocolError(amqp)
                if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
            {
                TopologyError::Mismatch {
                    queue: queue.to_owned(),
                    broker_says: amqp.get_message().to_string(),
                }
            }
            _ => TopologyError::Broker {
                queue: queue.to_owned(),
                source,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_pick_the_longest_tier_that_does_not_overshoot() {
        let topology = Topology::new("t");
        assert_eq!(
            topology.tier_for(Duration::from_millis(200)),
            Duration::from_secs(1)
        );
        assert_eq!(
            topology.tier_for(Duration::from_secs(7)),
            Duration::from_secs(5)
        );
        assert_eq!(
            topology.tier_for(Duration::from_secs(3600)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn retention_takes_rabbitmq_max_age_syntax() {
        for good in ["30D", "12h", "1Y", "90s"] {
            assert_eq!(good.parse::<Retention>().unwrap().to_string(), good);
        }
        for bad in ["", "D", "30", "30d", "-1D", "0D", "3.5D"] {
            assert!(bad.parse::<Retention>().is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_names_carry_prefix_and_tier() {
        let topology = Topology::new("t1")
            .with_delay_tiers(vec![Duration::from_millis(250), Duration::from_secs(2)]);
        assert_eq!(
            topology.delay_queue(Duration::from_millis(250)),
            "t1.delay.250ms"
        );
        assert_eq!(
            topology.delay_queue(Duration::from_secs(120)),
            "t1.delay.2m"
        );
        assert_eq!(topology.queue_names().len(), 9);
    }
}
