//! A lane: one channel in transaction mode whose deliveries hand off
//! together.
//!
//! A transaction covers everything sent on its channel since the last
//! commit, so several deliveries taken on one channel can share a commit.
//! A delivery's step writes its hand-off into an [`Outbox`]; nothing goes
//! to the broker until the step is done. Its commit queues the outbox for
//! the lane's [`Committer`], which sends every outbox queued since its last
//! round, commits them, acks their deliveries and commits again (see
//! [`Committer::serve`]). A delivery waits only for the round its own
//! outbox is in, never for another delivery's step. Rounds of up to 32
//! deliveries carry more DMS CPEs a second than a commit per delivery or
//! rounds of 16 (see `SLOTS_PER_LANE` in [`crate::consumer`]).

use flotilla_common::{BrokerError, Event, EventRecord, Message, Topology, TxPublisher};
use lapin::{Acker, Channel, options::BasicAckOptions};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// A round that takes longer than this is stuck (a queue's leader moving
/// in the middle of a commit can leave it unanswered): it fails, and with
/// it the session, whose deliveries go back to the queue. Rounds take
/// milliseconds; a broker blocking publishers (a memory alarm) makes the
/// worker reconnect at this pace, each time returning its deliveries.
const ROUND_LIMIT: Duration = Duration::from_secs(30);
/// Outboxes waiting for a round, at most: more than a lane has deliveries.
const QUEUED: usize = 64;

/// What one delivery hands off, until its commit.
pub(crate) struct Outbox {
    lane: Handle,
    handoff: Handoff,
}

/// A delivery's messages, and its events for the lane's events record.
#[derive(Default)]
struct Handoff {
    messages: Vec<Outgoing>,
    events: Vec<Event>,
    /// The delivery's hop, when that record is its hand-off's record.
    recorded_hop: Option<String>,
}

struct Outgoing {
    queue: String,
    body: Vec<u8>,
    message: Message,
}

impl Outbox {
    /// Adds a persistent message to the hand-off.
    pub(crate) fn send(&mut self, queue: &str, body: Vec<u8>, message: Message) {
        self.handoff.messages.push(Outgoing {
            queue: queue.to_owned(),
            body,
            message,
        });
    }

    /// Adds events, in order, to the events record of the delivery's round.
    /// With `hop`, that record is also the delivery's hand-off record (see
    /// [`crate::fence`]), for a hand-off that sends no job.
    pub(crate) fn record(&mut self, events: Vec<Event>, hop: Option<String>) {
        if events.is_empty() {
            return;
        }
        self.handoff.events.extend(events);
        if hop.is_some() {
            self.handoff.recorded_hop = hop;
        }
    }

    /// Drops everything added so far (a step that panicked half-way).
    pub(crate) fn discard(&mut self) {
        self.handoff = Handoff::default();
    }

    /// Commits everything added so far, then acks the delivery of `acker`
    /// (see [`Committer::serve`]). An error means the lane failed: the
    /// session closes its connection, which returns the delivery to the
    /// queue.
    pub(crate) async fn commit(&mut self, acker: &Acker) -> Result<(), BrokerError> {
        let (done, committed) = oneshot::channel();
        let queued = Queued {
            handoff: std::mem::take(&mut self.handoff),
            acker: acker.clone(),
            done,
        };
        self.lane
            .rounds
            .send(queued)
            .await
            .map_err(|_| BrokerError::ConnectionLost)?;
        committed.await.map_err(|_| BrokerError::ConnectionLost)?
    }
}

/// The deliveries' handle on their lane's commits.
#[derive(Clone)]
pub(crate) struct Handle {
    rounds: mpsc::Sender<Queued>,
}

struct Queued {
    handoff: Handoff,
    acker: Acker,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// Commits the outboxes a lane's deliveries queue; runs as long as the
/// lane.
pub(crate) struct Committer {
    publisher: TxPublisher,
    rounds: mpsc::Receiver<Queued>,
    events: String,
    handoffs: String,
}

/// A lane on `channel`, which must be the channel its deliveries came on
/// (their acks are part of its transactions), writing the streams of
/// `topology`.
pub(crate) async fn new(
    channel: Channel,
    topology: &Topology,
) -> Result<(Handle, Committer), BrokerError> {
    let publisher = TxPublisher::on(channel).await?;
    let (sender, receiver) = mpsc::channel(QUEUED);
    Ok((
        Handle { rounds: sender },
        Committer {
            publisher,
            rounds: receiver,
            events: topology.events(),
            handoffs: topology.handoffs(),
        },
    ))
}

impl Handle {
    /// An empty outbox for one of the lane's deliveries.
    pub(crate) fn outbox(&self) -> Outbox {
        Outbox {
            lane: self.clone(),
            handoff: Handoff::default(),
        }
    }
}

impl Committer {
    /// Runs rounds until every [`Handle`] is gone or the channel
    /// fails: each takes every outbox queued, sends their messages, commits,
    /// acks their deliveries and commits the acks.
    ///
    /// One commit for messages and acks is not one outcome: RabbitMQ
    /// applies a commit's acks at once but its messages queue by queue, and
    /// a connection lost mid-commit was seen (1 job in 200, the broker
    /// connection cut under load) to keep the ack and an event while losing
    /// the next job message. The first commit's answer comes once every
    /// queue holds its message; only then are the deliveries acked. A
    /// worker that dies between the two commits leaves its deliveries to be
    /// redelivered with their hand-offs already published, as with
    /// publisher confirms: the fence drops them.
    pub(crate) async fn serve(mut self) -> Result<(), BrokerError> {
        let mut round = Vec::new();
        while let Some(first) = self.rounds.recv().await {
            round.push(first);
            while let Ok(next) = self.rounds.try_recv() {
                round.push(next);
            }
            let committed = tokio::time::timeout(ROUND_LIMIT, self.commit(&mut round))
                .await
                .unwrap_or_else(|_| {
                    Err(BrokerError::Commit {
                        reason: format!("no answer within {ROUND_LIMIT:?}"),
                    })
                });
            for queued in round.drain(..) {
                let answer = match &committed {
                    Ok(()) => Ok(()),
                    Err(error) => Err(BrokerError::Commit {
                        reason: error.to_string(),
                    }),
                };
                let _ = queued.done.send(answer);
            }
            committed?;
        }
        Ok(())
    }

    async fn commit(&self, round: &mut [Queued]) -> Result<(), BrokerError> {
        let mut outgoing = Vec::new();
        let mut events = Vec::new();
        let mut hops = Vec::new();
        for queued in round.iter_mut() {
            let handoff = std::mem::take(&mut queued.handoff);
            outgoing.extend(handoff.messages);
            events.extend(handoff.events);
            hops.extend(handoff.recorded_hop);
        }
        if !events.is_empty() {
            // The round's events in one record: the stream's cost is per
            // record, and a round hands off up to a lane's deliveries.
            let (body, kind) = EventRecord::encode(&events);
            let mut message = Message::new(kind);
            if !hops.is_empty() {
                let hops: Vec<&str> = hops.iter().map(String::as_str).collect();
                message = message.hands_off_all(&hops, &self.handoffs);
            }
            outgoing.push(Outgoing {
                queue: self.events.clone(),
                body,
                message,
            });
        }
        self.publisher
            .send_all(outgoing.iter_mut().map(
                |Outgoing {
                     queue,
                     body,
                     message,
                 }| { (queue.as_str(), body.as_slice(), std::mem::take(message)) },
            ))
            .await?;
        self.publisher.commit().await?;
        // Together, as the messages are (see `TxPublisher::send_all`).
        futures::future::try_join_all(
            round
                .iter()
                .map(|queued| queued.acker.ack(BasicAckOptions::default())),
        )
        .await?;
        self.publisher.commit().await?;
        debug!(deliveries = round.len(), "handed off and acked");
        Ok(())
    }
}
