//! The worker's connection lifecycle and consume loop.
//!
//! A session is one broker connection: declare the topology, read the
//! control stream to its end, then run the worker's `concurrency` slots in
//! lanes. A lane is one consumer on a channel of its own, in transaction
//! mode, taking up to 32 deliveries at once (its prefetch): each runs
//! as soon as it arrives, and its hand-off (what follows, its events, then
//! its ack) is committed on that channel in the lane's next round, with
//! those of the lane's other deliveries whose steps are done by then (see
//! [`crate::lane`]). No delivery waits for another's long step. A hand-off
//! that fails (the broker refused it, or the channel broke) ends the
//! session like a lost connection: the connection is closed, which returns
//! every delivery to the queue at once, `/readyz` turns red, and `run`
//! starts a new session after a backoff that grows while sessions keep
//! failing, so a broker that keeps refusing is not asked again at full
//! speed (each return counts toward the queue's delivery limit).

use crate::{
    WorkerError,
    config::WorkerConfig,
    delivery::{self, Shared},
    driver::Rejection,
    fence::{self, Fence},
    lane::{self, Committer, Outbox},
};
use flotilla_common::{
    Broker, BrokerError, JOB_MESSAGE_TYPE, Message, Topology, TopologyError, broker,
    control::ControlMessage,
    headers,
    ops::Readiness,
    stream::{Marker, Offset, Record, StreamReader},
};
use futures::{FutureExt, StreamExt};
use lapin::{
    Consumer,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A lane's slots: the deliveries that may share a commit round (and one
/// events record). One worker, 64 slots, `flotilla-bench throughput
/// --workers 1 --repeats 1 --no-memory`, three rounds of 16, 32 and 64 run
/// in turn: 16 gave 1,035, 1,622 and 1,535 devices/s, 32 gave 1,815, 1,951
/// and 2,117, 64 (one lane) 1,338, 1,970 and 2,240 with the polls' p99
/// lateness twice as high. (Before a round shared one events record, 16
/// and 32 had been even.)
const SLOTS_PER_LANE: u16 = 32;
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
    let mut refusals = Refusals::default();
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
                let Some(gives_up_in) = refusals.patience_left(Instant::now(), connected_before)
                else {
                    return Err(WorkerError::LoginRefused {
                        source: error,
                        connected_before,
                    });
                };
                error!(%error, retry_in = ?backoff, ?gives_up_in, "RabbitMQ refused the worker's login; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
            Err(SessionError::Broker(error)) => {
                refusals = Refusals::default();
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

/// Logins the broker refused in a row.
#[derive(Debug, Default)]
struct Refusals {
    /// When the first of them was refused.
    since: Option<Instant>,
}

impl Refusals {
    /// Counts a refusal at `now`: how much longer to keep trying, or
    /// `None` to give up. A login that never worked is a mistake in the
    /// settings: stop and say so, rather than retry in silence. One that
    /// worked may be refused for a while (credentials being rotated, a
    /// broker importing its definitions): retry, loudly, for a while.
    fn patience_left(&mut self, now: Instant, connected_before: bool) -> Option<Duration> {
        let since = *self.since.get_or_insert(now);
        let left = REFUSED_PATIENCE.checked_sub(now.duration_since(since))?;
        (connected_before && !left.is_zero()).then_some(left)
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
    shared
        .topology
        .declare(broker)
        .await
        .map_err(|error| match error {
            TopologyError::Broker { source, .. } => SessionError::Broker(source.into()),
            TopologyError::Connect(error) => SessionError::Broker(error),
            mismatch => SessionError::Topology(mismatch),
        })?;
    let connection = broker.connection().await?;
    // Counted once connected, not once every lane is open: opening them
    // takes a round trip each, and a connection can drop before the last.
    if *connected_before {
        shared.metrics.reconnected();
    }
    *connected_before = true;
    // Know every campaign's mode before taking a job, so no step of a
    // paused or cancelled campaign runs: every command written before the
    // marker is read before it comes back, however busy the stream.
    let mut control =
        StreamReader::open(&connection, &shared.topology.control(), Offset::First).await?;
    let caught_up = Marker::publish(&connection, control.stream()).await?;
    control
        .read_to(&caught_up, |record| apply_control(shared, &record))
        .await?;
    let jobs = shared.topology.jobs();
    let (fence, fence_reads) = fence::new(shared.topology.handoffs());
    let fence_reads = fence_reads.serve(&connection);
    tokio::pin!(fence_reads);
    let stop_taking = CancellationToken::new();
    let mut lanes: JoinSet<(Lane, Result<(), BrokerError>)> = JoinSet::new();
    // Lanes that stopped, kept open until the connection closes (see
    // `Lane::run`).
    let mut stopped: Vec<Lane> = Vec::new();
    for slots in lane_sizes(config.concurrency) {
        if stop_taking.is_cancelled() {
            break;
        }
        let lane = Lane::open(&connection, &shared.topology, slots).await?;
        lanes.spawn(lane.run(shared.clone(), fence.clone(), stop_taking.clone()));
    }
    readiness.set(true);
    info!(queue = %jobs, concurrency = config.concurrency, "consuming");

    let ended: Result<(), SessionError> = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            // Runs as long as the session holds `fence`, past this loop.
            () = &mut fence_reads => break Err(BrokerError::ConnectionLost.into()),
            record = control.next() => match record {
                Some(Ok(record)) => apply_control(shared, &record),
                Some(Err(error)) => break Err(error.into()),
                None => break Err(BrokerError::ConnectionLost.into()),
            },
            Some(joined) = lanes.join_next() => match joined {
                Ok((lane, result)) => {
                    stopped.push(lane);
                    if let Err(error) = result {
                        break Err(error.into());
                    }
                }
                Err(_) => break Err(BrokerError::ConnectionLost.into()),
            },
        }
    };
    readiness.set(false);
    stop_taking.cancel();
    if ended.is_ok() {
        // The lanes finishing their steps may still look a redelivery up.
        tokio::select! {
            _ = drain(&mut lanes, &mut stopped, config.shutdown_grace) => {}
            _ = &mut fence_reads => {}
        }
    }
    drop(fence);
    // Closing the connection returns every delivery still unacked (after a
    // failed hand-off, a lost connection or the grace period) at once, and
    // only then are the lanes dropped.
    broker::close_connection(&connection, "worker session ending").await;
    lanes.abort_all();
    while lanes.join_next().await.is_some() {}
    drop(stopped);
    ended
}

/// How many slots each lane has: `concurrency` in all, at most
/// [`SLOTS_PER_LANE`] each, as even as can be.
fn lane_sizes(concurrency: u16) -> impl Iterator<Item = u16> {
    let lanes = concurrency.div_ceil(SLOTS_PER_LANE);
    (0..lanes).map(move |lane| concurrency / lanes + u16::from(lane < concurrency % lanes))
}

/// One consumer of the jobs queue, on a channel of its own in transaction
/// mode, running up to its prefetch of deliveries at once.
struct Lane {
    consumer: Consumer,
    handle: lane::Handle,
    committer: Option<Committer>,
}

impl Lane {
    async fn open(
        connection: &lapin::Connection,
        topology: &Topology,
        slots: u16,
    ) -> Result<Lane, BrokerError> {
        let channel = connection.create_channel().await?;
        channel.basic_qos(slots, BasicQosOptions::default()).await?;
        let (handle, committer) = lane::new(channel.clone(), topology).await?;
        let consumer = channel
            .basic_consume(
                topology.jobs().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Lane {
            consumer,
            handle,
            committer: Some(committer),
        })
    }

    /// Takes deliveries until `stop` (finishing those under way) or until
    /// a hand-off fails, which stops every lane of the session. Gives the
    /// lane back, open: a delivery the broker sent ahead stays unacked
    /// until the session closes the connection, which returns every lane's
    /// at once. A consumer cancelled or a channel closed (as dropping a
    /// lane does) one by one would hand it to the next lane still open,
    /// each time spending one of its deliveries (the queue's delivery
    /// limit).
    async fn run(
        mut self,
        shared: Arc<Shared>,
        fence: Fence,
        stop: CancellationToken,
    ) -> (Lane, Result<(), BrokerError>) {
        let result = self.take(&shared, &fence, &stop).await;
        if let Err(error) = &result {
            // The session closes the connection: the open transaction is
            // discarded and the lane's deliveries go back to the queue now,
            // not at the broker's consumer timeout.
            shared.metrics.handoff_failed();
            warn!(%error, "could not hand off a delivery; the lane's deliveries go back to the queue");
            // The other lanes stop taking deliveries too: the broker
            // would refuse theirs alike, and a delivery bounced from lane
            // to lane would spend its delivery limit at once.
            stop.cancel();
        }
        (self, result)
    }

    async fn take(
        &mut self,
        shared: &Arc<Shared>,
        fence: &Fence,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let committer = self.committer.take().expect("a lane runs once");
        let serving = committer.serve();
        tokio::pin!(serving);
        // The committer ends only when it fails: the lane holds a handle.
        let lost = |served: Result<(), BrokerError>| served.and(Err(BrokerError::ConnectionLost));
        let mut steps: JoinSet<Result<(), BrokerError>> = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                served = &mut serving => return lost(served),
                Some(joined) = steps.join_next() => step_result(joined)?,
                _ = stop.cancelled() => break,
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let outbox = self.handle.outbox();
                        steps.spawn(run_delivery(delivery, outbox, shared.clone(), fence.clone()));
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(BrokerError::ConnectionLost),
                },
            }
        }
        // The steps under way finish, their commits still served.
        while !steps.is_empty() {
            tokio::select! {
                served = &mut serving => return lost(served),
                Some(joined) = steps.join_next() => step_result(joined)?,
            }
        }
        Ok(())
    }
}

/// A delivery task's result; one that panicked outside its step (the step
/// itself is caught) counts as a broken lane.
fn step_result(
    joined: Result<Result<(), BrokerError>, tokio::task::JoinError>,
) -> Result<(), BrokerError> {
    joined.unwrap_or(Err(BrokerError::ConnectionLost))
}

/// Folds one control-stream record into the worker's book.
fn apply_control(shared: &Shared, record: &Record) {
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
}

/// One delivery, up to its committed hand-off.
async fn run_delivery(
    delivery: lapin::message::Delivery,
    mut outbox: Outbox,
    shared: Arc<Shared>,
    fence: Fence,
) -> Result<(), BrokerError> {
    shared.metrics.delivered();
    let handled = AssertUnwindSafe(delivery::handle(&delivery, &mut outbox, &shared, &fence))
        .catch_unwind()
        .await;
    match handled {
        Ok(result) => result,
        Err(_) => {
            outbox.discard();
            return_panicked(&delivery, &mut outbox, &shared).await
        }
    }
}

/// A driver bug: the step panicked. The job goes back to the queue by
/// republishing it with its return counted in a header, and is
/// dead-lettered once it has come back `return_limit` times. Counted here,
/// not by the broker: from RabbitMQ 4.3 a `nack` no longer counts toward
/// the queue's delivery limit, so a job that crashes every step would
/// circle for ever.
async fn return_panicked(
    delivery: &lapin::message::Delivery,
    outbox: &mut Outbox,
    shared: &Shared,
) -> Result<(), BrokerError> {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    let returns = headers::get_int(Some(&table), headers::RETURNS).unwrap_or(0) + 1;
    if returns > i64::from(shared.return_limit) {
        let rejection = Rejection {
            reason: "return_limit",
            detail: format!(
                "its step panicked {returns} times (FLOTILLA_RETURN_LIMIT is {})",
                shared.return_limit
            ),
        };
        return delivery::dead_letter(delivery, outbox, shared, rejection).await;
    }
    error!(
        returns,
        "a step panicked; returning its message to the queue"
    );
    headers::set(&mut table, headers::RETURNS, returns);
    // The broker's count belongs to the delivery, not to the new message.
    headers::remove(&mut table, &[headers::DELIVERY_COUNT]);
    let mut message = delivery::hands_off(
        Message::new(JOB_MESSAGE_TYPE).headers(table),
        delivery,
        shared,
    );
    if let Some(id) = delivery.properties.message_id() {
        message = message.id(id.as_str());
    }
    outbox.send(&shared.topology.jobs(), delivery.data.clone(), message);
    delivery::commit(delivery, outbox).await
}

/// Lets the lanes finish their steps within `grace`, keeping each open.
async fn drain(
    lanes: &mut JoinSet<(Lane, Result<(), BrokerError>)>,
    stopped: &mut Vec<Lane>,
    grace: Duration,
) {
    info!(?grace, "finishing in-flight steps");
    let finished = tokio::time::timeout(grace, async {
        while let Some(joined) = lanes.join_next().await {
            if let Ok((lane, _)) = joined {
                stopped.push(lane);
            }
        }
    })
    .await;
    match finished {
        Ok(()) => info!("drained: every in-flight step finished"),
        Err(_) => warn!(
            abandoned_lanes = lanes.len(),
            "grace period over; abandoning steps, which the broker will redeliver"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_share_the_slots_evenly_a_lanes_worth_at_most() {
        for concurrency in 1..=200 {
            let sizes: Vec<u16> = lane_sizes(concurrency).collect();
            assert_eq!(sizes.iter().sum::<u16>(), concurrency);
            assert!(sizes.iter().all(|&n| (1..=SLOTS_PER_LANE).contains(&n)));
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.unwrap() - min.unwrap() <= 1, "{concurrency}: {sizes:?}");
        }
        assert_eq!(lane_sizes(64).collect::<Vec<_>>(), vec![32; 2]);
        assert_eq!(lane_sizes(40).collect::<Vec<_>>(), vec![20, 20]);
        assert_eq!(lane_sizes(20).collect::<Vec<_>>(), vec![20]);
    }

    #[test]
    fn a_refused_first_login_gives_up_at_once() {
        let mut refusals = Refusals::default();
        assert_eq!(refusals.patience_left(Instant::now(), false), None);
    }

    #[test]
    fn a_login_that_worked_is_retried_for_two_minutes_of_refusals() {
        let mut refusals = Refusals::default();
        let start = Instant::now();
        assert_eq!(refusals.patience_left(start, true), Some(REFUSED_PATIENCE));
        let later = start + Duration::from_secs(90);
        assert_eq!(
            refusals.patience_left(later, true),
            Some(Duration::from_secs(30))
        );
        assert_eq!(refusals.patience_left(start + REFUSED_PATIENCE, true), None);
    }
}
