//! Publishing jobs with transactions under way side by side: a batch of
//! jobs and the record of their `published` events are one transaction,
//! as ever, but while one commits the next is sent on another channel, so
//! the broker is never idle waiting for the controller nor the controller
//! for the broker.
//!
//! Each transaction stands alone: a crash or a lost connection leaves each
//! batch wholly published or not at all, and the stream says which (a
//! restarted or reconnected controller reads it before it publishes
//! again). A batch's events are applied to the campaign's state only once
//! its commit is answered; until then its devices count as being
//! published ([`Steering::publishing`](super::Steering)), neither started
//! nor to start.

use flotilla_common::{BrokerError, Event, TxPublisher};
use futures::{FutureExt, StreamExt, stream::FuturesOrdered};
use lapin::Connection;
use tokio::task::JoinHandle;

/// Transactions under way at once at most.
pub(super) const DEPTH: usize = 4;

/// A committed batch: its `published` events, to apply.
pub(super) type Committed = Vec<Event>;

/// A commit runs as a task of its own: it goes on while the controller
/// does something else, and a handle is all the controller holds.
type Commit = JoinHandle<Done>;

/// A commit's channel (free again) and its answer.
type Done = (TxPublisher, Result<Committed, BrokerError>);

pub(super) struct Launcher {
    /// Channels in transaction mode with nothing sent on them.
    idle: Vec<TxPublisher>,
    /// Commits under way, oldest first.
    committing: FuturesOrdered<Commit>,
}

impl Launcher {
    pub(super) async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let mut idle = Vec::with_capacity(DEPTH);
        for _ in 0..DEPTH {
            idle.push(TxPublisher::open(connection).await?);
        }
        Ok(Launcher {
            idle,
            committing: FuturesOrdered::new(),
        })
    }

    /// A channel to send a batch on, waiting for the oldest commit if all
    /// are busy; with what that commit published.
    pub(super) async fn channel(
        &mut self,
    ) -> Result<(TxPublisher, Option<Committed>), BrokerError> {
        if let Some(channel) = self.idle.pop() {
            return Ok((channel, None));
        }
        let (channel, committed) = joined(self.committing.next().await);
        Ok((channel, Some(committed?)))
    }

    /// Commits what was sent on `channel` (the batch whose events are
    /// `events`), in the background.
    pub(super) fn commit(&mut self, channel: TxPublisher, events: Committed) {
        self.committing.push_back(tokio::spawn(async move {
            let committed = channel.commit().await.map(|()| events);
            (channel, committed)
        }));
    }

    pub(super) fn is_committing(&self) -> bool {
        !self.committing.is_empty()
    }

    /// The next commit to be answered; pending for ever if none is under
    /// way (for `select!`).
    pub(super) async fn committed(&mut self) -> Result<Committed, BrokerError> {
        if self.committing.is_empty() {
            return std::future::pending().await;
        }
        let (channel, committed) = joined(self.committing.next().await);
        self.idle.push(channel);
        committed
    }

    /// Commits already answered, without waiting.
    pub(super) fn answered(&mut self) -> Vec<Result<Committed, BrokerError>> {
        let mut answered = Vec::new();
        while let Some(Some(done)) = self.committing.next().now_or_never() {
            let (channel, committed) = joined(Some(done));
            self.idle.push(channel);
            answered.push(committed);
        }
        answered
    }

    /// Puts a channel back that has nothing sent on it.
    pub(super) fn give_back(&mut self, channel: TxPublisher) {
        self.idle.push(channel);
    }
}

/// A commit task's result. The task only awaits the broker: it panics
/// only if the controller's own code does, and so does the controller.
fn joined(done: Option<Result<Done, tokio::task::JoinError>>) -> Done {
    match done.expect("a commit is under way") {
        Ok(done) => done,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}
