//! Connecting to RabbitMQ and publishing with confirms.
//!
//! Channels are long-lived and never shared between tasks that publish
//! concurrently: with lapin, two tasks awaiting confirms on one channel can
//! receive each other's confirms. Each publishing task owns a [`Publisher`].

use crate::headers;
use deadpool_lapin::{Config, Pool, Runtime};
use lapin::{
    BasicProperties, Channel, ConnectionProperties, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use std::time::Duration;

/// The broker every command uses unless told otherwise.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// AMQP delivery mode that survives a broker restart.
const PERSISTENT: u8 = 2;

/// How long to wait for the broker to accept a connection before saying it
/// is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reach RabbitMQ at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("invalid AMQP URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker connection was lost")]
    ConnectionLost,
    #[error("RabbitMQ refused (nacked) a message for {queue}")]
    Nacked { queue: String },
}

/// A handle on one RabbitMQ broker; cheap to clone. Connections come from a
/// small pool that replaces a dropped connection on the next request.
#[derive(Clone)]
pub struct Broker {
    pool: Pool,
    /// The URL with its password masked, for messages.
    display_url: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.display_url)
            .finish()
    }
}

impl Broker {
    /// `name` shows in RabbitMQ's connection list (say which process it is).
    pub fn new(url: &str, name: &str) -> Result<Self, BrokerError> {
        let display_url = redact_url(url);
        let name = name.to_owned();
        let config = Config {
            url: Some(url.to_owned()),
            ..Config::default()
        };
        let pool = config
            .builder(
                move || ConnectionProperties::default().with_connection_name(name.clone().into()),
                Runtime::Tokio1,
            )
            .map_err(|e| BrokerError::BadUrl {
                url: display_url.clone(),
                reason: e.to_string(),
            })?
            .max_size(4)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| BrokerError::BadUrl {
                url: display_url.clone(),
                reason: e.to_string(),
            })?;
        Ok(Broker { pool, display_url })
    }

    /// The broker URL with its password masked.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// A live connection: a pooled one, or a new one if the last has dropped.
    pub async fn connection(&self) -> Result<deadpool_lapin::Connection, BrokerError> {
        self.pool.get().await.map_err(|e| BrokerError::Unreachable {
            url: self.display_url.clone(),
            reason: match e {
                deadpool_lapin::PoolError::Backend(e) => e.to_string(),
                deadpool_lapin::PoolError::Timeout(_) => "timed out".to_owned(),
                other => other.to_string(),
            },
        })
    }
}

/// Masks the password of an AMQP URL so it can be logged.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Cannot fail: the URL already has a password, so it has a host.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable AMQP URL>".to_owned(),
    }
}

/// A channel in confirm mode, owned by one publishing task.
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &lapin::Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Sends a persistent message to `queue`; the returned [`Confirm`]
    /// resolves when the broker has taken responsibility for it.
    pub async fn send(
        &self,
        queue: &str,
        body: &[u8],
        message: Message,
    ) -> Result<Confirm, BrokerError> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                message.into_properties(),
            )
            .await?;
        Ok(Confirm {
            queue: queue.to_owned(),
            confirm,
        })
    }

    /// Sends and waits for the broker's confirm.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        message: Message,
    ) -> Result<(), BrokerError> {
        self.send(queue, body, message).await?.wait().await
    }
}

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

    /// Makes every message sent since the last commit durable at once.
    pub async fn commit(&self) -> Result<(), BrokerError> {
        self.channel.tx_commit().await?;
        Ok(())
    }
}

/// A pending publisher confirm.
pub struct Confirm {
    queue: String,
    confirm: PublisherConfirm,
}

impl Confirm {
    /// Waits for the broker's answer; a nack is an error (lapin reports it
    /// as a successful `Confirmation::Nack`).
    pub async fn wait(self) -> Result<(), BrokerError> {
        if self.confirm.await?.is_ack() {
            Ok(())
        } else {
            Err(BrokerError::Nacked { queue: self.queue })
        }
    }
}

/// The metadata of a message: what it is and its headers (trace context,
/// due time, dead-letter reason).
#[derive(Debug, Clone, Default)]
pub struct Message {
    kind: &'static str,
    id: Option<String>,
    headers: FieldTable,
}

impl Message {
    /// `kind` names the payload type (`flotilla.job.v1`).
    pub fn new(kind: &'static str) -> Self {
        Message {
            kind,
            ..Message::default()
        }
    }

    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn headers(mut self, headers: FieldTable) -> Self {
        self.headers = headers;
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<headers::Value>) -> Self {
        headers::set(&mut self.headers, name, value);
        self
    }

    fn into_properties(self) -> BasicProperties {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_type(self.kind.into())
            .with_timestamp(chrono::Utc::now().timestamp() as u64)
            .with_headers(self.headers);
        if let Some(id) = self.id {
            properties = properties.with_message_id(id.into());
        }
        properties
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@10.0.0.1:5672/%2f"),
            "amqp://guest:***@10.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://10.0.0.1"), "amqp://10.0.0.1");
    }
}
