//! Publishing in AMQP transactions: a hand-off's messages and acks as one
//! outcome.

use crate::{BrokerError, Message};
use lapin::{Channel, options::BasicPublishOptions};

/// A channel in transaction mode, owned by one publishing task: the messages
/// sent between two commits reach their queues together or not at all, even
/// if this process dies in between (the broker drops uncommitted messages
/// with the channel). The producer uses it so that a device's job and the
/// event recording its publication are never separated by a crash; a
/// worker, on the channel it consumes from, so that a delivery's ack and
/// what it hands on are one outcome.
///
/// A transaction has no confirms: a message that a queue refuses (a queue
/// at a length limit with `reject-publish`) is dropped while the commit
/// succeeds. Flotilla's queues have no length limit; none must be set on
/// them.
pub struct TxPublisher {
    channel: Channel,
}

impl TxPublisher {
    pub async fn open(connection: &lapin::Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        TxPublisher::on(channel).await
    }

    /// Puts `channel` (a consuming one, say) in transaction mode: its acks
    /// then take effect with the next commit, too.
    pub async fn on(channel: Channel) -> Result<Self, BrokerError> {
        channel.tx_select().await?;
        Ok(TxPublisher { channel })
    }

    /// Discards every message and ack since the last commit.
    pub async fn rollback(&self) -> Result<(), BrokerError> {
        self.channel.tx_rollback().await?;
        Ok(())
    }

    /// Adds a persistent message to the current transaction.
    pub async fn send(
        &self,
        queue: &str,
        body: &[u8],
        message: Message,
    ) -> Result<(), BrokerError> {
        // Without confirm mode the returned confirm resolves at once (to
        // `NotRequested`); the commit is what the broker answers for.
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                message.into_properties(),
            )
            .await?
            .await?;
        Ok(())
    }

    /// Adds persistent messages to the current transaction, all handed to
    /// the connection at once. lapin writes from a thread of its own and
    /// answers each publish once it has written it: sent one by one, every
    /// message waits for a round trip to that thread, sent together they
    /// share one.
    pub async fn send_all<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a [u8], Message)>,
    ) -> Result<(), BrokerError> {
        futures::future::try_join_all(
            messages
                .into_iter()
                .map(|(queue, body, message)| self.send(queue, body, message)),
        )
        .await?;
        Ok(())
    }

    /// Makes every message sent since the last commit durable at once.
    pub async fn commit(&self) -> Result<(), BrokerError> {
        self.channel.tx_commit().await?;
        Ok(())
    }
}
