//! The worker's connection lifecycle and consume loop.
//!
//! A session is one broker connection: declare the topology, consume the
//! jobs queue with a bounded prefetch, and run at most `concurrency`
//! deliveries at once, each in its own task with its own confirm-mode
//! channel. When the connection drops, the session ends and `run` starts a
//! new one; unacked deliveries go back to the queue by themselves.

use crate::{
    WorkerError,
    config::WorkerConfig,
    delivery::{self, Shared},
};
use flotilla_common::{
    Broker, BrokerError, Publisher, TopologyError,
    control::ControlMessage,
    ops::Readiness,
    stream::{Offset, Record, StreamReader},
};
use futures::{FutureExt, StreamExt};
use lapin::{
    options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::FieldTable,
};
use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The control stream is read to its end before jobs are taken; a pause
/// this long without a record means the end.
const CONTROL_CATCH_UP: Duration = Duration::from_millis(300);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long a worker that has consumed before keeps trying a login the
/// broker refuses before it gives up.
const REFUSED_PATIENCE: Duration = Duration::from_secs(120);

/// Runs sessions until `shutdown` is cancelled, reconnecting after a lost
/// connection.
pub(crate) async fn run_sessions(
    config: &WorkerConfig,
    broker: &Broker,
    shared: Arc<Shared>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut connected_before = false;
    // When the broker first refused the login, in the current run of
    // refusals.
    let mut refused_since: Option<Instant> = None;
    loop {
        let started = Instant::now();
        match session(
            config,
            broker,
            &shared,
            readiness,
            shutdown,
            &mut connected_before,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(SessionError::Topology(error)) => return Err(WorkerError::Topology(error)),
            Err(SessionError::Broker(error)) if error.is_refused() => {
                readiness.set(false);
                let since = *refused_since.get_or_insert_with(Instant::now);
                // A login that never worked is a mistake in the settings:
                // say so and stop, rather than retry in silence. One that
                // worked may be refused for a while (credentials being
                // rotated, a broker importing its definitions): retry,
                // loudly, for a while.
                if !connected_before || since.elapsed() >= REFUSED_PATIENCE {
                    return Err(WorkerError::LoginRefused {
                        source: error,
                        connected_before,
                    });
                }
                error!(%error, retry_in = ?backoff, gives_up_in = ?REFUSED_PATIENCE.saturating_sub(since.elapsed()), "RabbitMQ refused the worker's login; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
            Err(SessionError::Broker(error)) => {
                refused_since = None;
                readiness.set(false);
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                // A session that ran a while earns a quick reconnect.
                if started.elapsed() > RECONNECT_BACKOFF_MAX {
                    backoff = RECONNECT_BACKOFF_MIN;
                }
                warn!(%error, retry_in = ?backoff, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }
}

enum SessionError {
    /// The connection failed or dropped: worth reconnecting.
    Broker(BrokerError),
    /// The broker's queues disagree with ours: reconnecting cannot help.
    Topology(TopologyError),
}

impl From<BrokerError> for SessionError {
    fn from(error: BrokerError) -> Self {
        SessionError::Broker(error)
    }
}

impl From<lapin::Error> for SessionError {
    fn from(error: lapin::Error) -> Self {
        SessionError::Broker(error.into())
    }
}

async fn session(
    config: &WorkerConfig,
    broker: &Broker,
    shared: &Arc<Shared>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
    connected_before: &mut bool,
) -> Result<(), SessionError> {
    let connection = broker.connection().await?;
    shared
        .topology
        .declare(&connection)
        .await
        .map_err(|error| match error {
            TopologyError::Broker { source, .. } => SessionError::Broker(source.into()),
            mismatch => SessionError::Topology(mismatch),
        })?;
    // Know every campaign's mode before taking a job, so no step of a
    // paused or cancelled campaign runs.
    let mut control =
        StreamReader::open(&connection, &shared.topology.control(), Offset::First).await?;
    while let Ok(record) = tokio::time::timeout(CONTROL_CATCH_UP, control.next()).await {
        apply_control(shared, record)?;
    }
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            shared.topology.jobs().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if *connected_before {
        shared.metrics.reconnected();
    }
    *connected_before = true;
    readiness.set(true);
    info!(queue = %shared.topology.jobs(), prefetch = config.prefetch, concurrency = config.concurrency, "consuming");

    let concurrency = usize::from(config.concurrency);
    let mut tasks: JoinSet<Option<Publisher>> = JoinSet::new();
    // Each task owns a channel while it runs: confirms on a shared channel
    // can reach the wrong task.
    let mut idle: Vec<Publisher> = Vec::new();
    let ended: Result<(), SessionError> = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            record = control.next() => {
                if let Err(error) = apply_control(shared, record) {
                    break Err(error);
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(Some(publisher)) = joined {
                    idle.push(publisher);
                }
            }
            next = consumer.next(), if tasks.len() < concurrency => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => break Err(error.into()),
                    None => break Err(BrokerError::ConnectionLost.into()),
                };
                let publisher = match idle.pop() {
                    Some(publisher) if publisher.is_usable() => publisher,
                    _ => match Publisher::open(&connection).await {
                        Ok(publisher) => publisher,
                        Err(error) => break Err(error.into()),
                    },
                };
                tasks.spawn(run_delivery(delivery, publisher, shared.clone()));
            }
        }
    };
    readiness.set(false);

    match ended {
        Ok(()) => {
            // Stop deliveries first; what was prefetched but not started
            // returns to the queue when the channel closes.
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            drain(tasks, config.shutdown_grace).await;
            let _ = channel.close(200, "worker shutting down".into()).await;
            let _ = connection.close(200, "worker shutting down".into()).await;
            Ok(())
        }
        Err(error) => {
            // Their deliveries died with the connection and will be
            // redelivered; finishing them would only fail to ack.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            Err(error)
        }
    }
}

/// Folds one control-stream record into the worker's book.
fn apply_control(
    shared: &Shared,
    record: Option<Result<Record, BrokerError>>,
) -> Result<(), SessionError> {
    let record = record.ok_or(BrokerError::ConnectionLost)??;
    match record.decode::<ControlMessage>() {
        Ok(message) => {
            info!(campaign = %message.campaign, command = message.command.as_str(), by = %message.by, "campaign command");
            shared
                .control
                .write()
                .expect("the control lock is never poisoned: nothing panics while holding it")
                .apply(&message);
        }
        Err(error) => {
            warn!(offset = ?record.offset, %error, "skipping a control record this build cannot read")
        }
    }
    Ok(())
}

/// One delivery's task. Gives its publisher back unless its channel broke.
async fn run_delivery(
    delivery: lapin::message::Delivery,
    publisher: Publisher,
    shared: Arc<Shared>,
) -> Option<Publisher> {
    let acker = delivery.acker.clone();
    let handled = AssertUnwindSafe(delivery::handle(delivery, &publisher, &shared))
        .catch_unwind()
        .await;
    match handled {
        Ok(Ok(())) => Some(publisher),
        Ok(Err(error)) => {
            warn!(%error, "could not finish a delivery; the broker will redeliver it");
            None
        }
        Err(_) => {
            // A driver bug. Requeue it: the queue's delivery limit
            // dead-letters a message that keeps crashing workers.
            error!("a step panicked; requeueing its message");
            let _ = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            Some(publisher)
        }
    }
}

async fn drain(mut tasks: JoinSet<Option<Publisher>>, grace: Duration) {
    let in_flight = tasks.len();
    if in_flight == 0 {
        info!("drained: no steps in flight");
        return;
    }
    info!(in_flight, ?grace, "finishing in-flight steps");
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    match finished {
        Ok(()) => info!("drained: every in-flight step finished"),
        Err(_) => {
            warn!(
                abandoned = tasks.len(),
                "grace period over; abandoning steps, which the broker will redeliver"
            );
            tasks.abort_all();
        }
    }
}
