//! The broker's own limits, measured beside every run on the same queue:
//! a raw step pipeline (consume, publish the next message with a confirm,
//! ack: what a worker's hand-off must do at least, with no HTTP and no
//! events) and raw confirmed publishes (what a fan-out must do at least).

use flotilla_common::Broker;
use futures::StreamExt;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueuePurgeOptions,
    },
    types::FieldTable,
};
use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Steps before the count starts: channels opening, the queue warming up.
const WARM_UP: Duration = Duration::from_millis(500);
/// About a step event's size, in bytes.
const EVENT_SIZE: usize = 300;
/// Unconfirmed publishes a raw publisher keeps in flight.
const PUBLISH_WINDOW: usize = 1000;

/// Persistent, as Flotilla's messages are.
fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Steps per second of `in_flight` messages circulating through `queue`,
/// each on a channel of its own with prefetch 1 (as a worker's slots
/// are), one connection for all: take a delivery, publish its body back
/// to the queue (and, with `events`, that many messages of an event's
/// size to that stream), wait for the confirms, ack. Counted for
/// `measure`; the queue is purged afterwards.
pub(crate) async fn step_pipeline(
    broker: &Broker,
    queue: &str,
    in_flight: usize,
    body: &[u8],
    measure: Duration,
    events: Option<(&str, usize)>,
) -> anyhow::Result<f64> {
    let connection = broker.connection().await?;
    publish_confirmed(&connection, queue, body, in_flight).await?;
    let steps = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut slots: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for _ in 0..in_flight {
        let channel = connection.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (steps, stop, queue) = (steps.clone(), stop.clone(), queue.to_owned());
        let events = events.map(|(stream, n)| (stream.to_owned(), n));
        slots.spawn(async move {
            loop {
                let delivery = tokio::select! {
                    _ = stop.cancelled() => break,
                    next = consumer.next() => match next {
                        Some(delivery) => delivery?,
                        None => anyhow::bail!("the raw pipeline's consumer on {queue} ended"),
                    },
                };
                let mut confirms = vec![
                    channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &delivery.data,
                            persistent(),
                        )
                        .await?,
                ];
                if let Some((stream, n)) = &events {
                    for _ in 0..*n {
                        confirms.push(
                            channel
                                .basic_publish(
                                    "".into(),
                                    stream.as_str().into(),
                                    BasicPublishOptions::default(),
                                    &delivery.data[..EVENT_SIZE.min(delivery.data.len())],
                                    persistent(),
                                )
                                .await?,
                        );
                    }
                }
                for confirm in confirms {
                    anyhow::ensure!(
                        confirm.await?.is_ack(),
                        "{queue} refused a raw pipeline message"
                    );
                }
                delivery.acker.ack(BasicAckOptions::default()).await?;
                steps.fetch_add(1, Ordering::Relaxed);
            }
            let _ = channel.close(200, "measured".into()).await;
            Ok(())
        });
    }
    tokio::time::sleep(WARM_UP).await;
    let (before, started) = (steps.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(measure).await;
    let counted = steps.load(Ordering::Relaxed) - before;
    let rate = counted as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    while let Some(slot) = slots.join_next().await {
        slot??;
    }
    purge(&connection, queue).await?;
    Ok(rate)
}

/// Publishes per second of `count` copies of `body` into `queue`, from one
/// channel in confirm mode with up to [`PUBLISH_WINDOW`] unconfirmed (the
/// queue is purged afterwards).
pub(crate) async fn publish_rate(
    broker: &Broker,
    queue: &str,
    body: &[u8],
    count: usize,
) -> anyhow::Result<f64> {
    let connection = broker.connection().await?;
    let started = Instant::now();
    publish_confirmed(&connection, queue, body, count).await?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    purge(&connection, queue).await?;
    Ok(rate)
}

async fn publish_confirmed(
    connection: &lapin::Connection,
    queue: &str,
    body: &[u8],
    count: usize,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = VecDeque::with_capacity(PUBLISH_WINDOW);
    for _ in 0..count {
        if pending.len() == PUBLISH_WINDOW {
            let confirm: lapin::PublisherConfirm = pending.pop_front().expect("the window is full");
            anyhow::ensure!(confirm.await?.is_ack(), "{queue} refused a raw publish");
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "{queue} refused a raw publish");
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(())
}

async fn purge(connection: &lapin::Connection, queue: &str) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(())
}
