//! `dead list` and `dead redrive`: the dead-letter queue for operators.
//!
//! Both take every message off the queue without acking it, so the queue
//! keeps what they leave: `list` acks nothing, and closing its channel
//! puts every message back where it was; `redrive` re-publishes those of
//! the campaign asked for to the jobs queue and acks each in the same
//! transaction, so a message is either still dead or queued again, never
//! both or neither. `redrive` takes only the messages the queue held when
//! it started: a job that dies again while it runs (one whose signature a
//! worker refuses, say) is left for the next redrive, not taken round again.

use flotilla_common::{
    Broker, BrokerError, JOB_MESSAGE_TYPE, Message, Topology, TxPublisher, broker, headers,
};
use lapin::{
    message::BasicGetMessage,
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};

/// Headers that describe a message's death (ours and the broker's) or its
/// past deliveries: a redriven job starts afresh without them.
const DEATH_HEADERS: [&str; 12] = [
    headers::DEAD_REASON,
    headers::DEAD_DETAIL,
    headers::DEAD_FROM,
    headers::RETURNS,
    headers::DELIVERY_COUNT,
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
];

/// One message of the dead-letter queue, as far as it can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub campaign: Option<String>,
    pub device: Option<String>,
    /// The worker's reason or, for a message the broker dead-lettered
    /// itself (its delivery limit), the broker's.
    pub reason: String,
    pub detail: Option<String>,
    /// Times workers returned it to the queue before it died.
    pub returns: i64,
}

impl DeadLetter {
    fn read(message: &BasicGetMessage) -> DeadLetter {
        let table = message.delivery.properties.headers().as_ref();
        let body: Option<serde_json::Value> = serde_json::from_slice(&message.delivery.data).ok();
        let text = |pointer: &str| {
            body.as_ref()
                .and_then(|b| b.pointer(pointer))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        DeadLetter {
            campaign: text("/campaign"),
            device: text("/device/id"),
            reason: headers::get_text(table, headers::DEAD_REASON)
                .or_else(|| headers::get_text(table, "x-first-death-reason"))
                .unwrap_or_else(|| "unknown".to_owned()),
            detail: headers::get_text(table, headers::DEAD_DETAIL),
            returns: headers::get_int(table, headers::RETURNS).unwrap_or(0),
        }
    }

    fn of_campaign(&self, campaign: Option<&str>) -> bool {
        campaign.is_none_or(|c| self.campaign.as_deref() == Some(c))
    }

    /// One line for `dead list`.
    pub fn line(&self) -> String {
        let unknown = || "-".to_owned();
        let mut line = format!(
            "{}\t{}\t{}",
            self.campaign.clone().unwrap_or_else(unknown),
            self.device.clone().unwrap_or_else(unknown),
            self.reason
        );
        if let Some(detail) = &self.detail {
            line.push_str(": ");
            line.push_str(detail);
        }
        if self.returns > 0 {
            line.push_str(&format!(" (returned {} times)", self.returns));
        }
        line
    }
}

/// The dead letters of `campaign` (every one without it), oldest first.
pub async fn list(
    broker: &Broker,
    topology: &Topology,
    campaign: Option<&str>,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let connection = broker.connection().await?;
    let channel = connection.create_channel().await?;
    let mut letters = Vec::new();
    while let Some(message) = get(&channel, topology).await? {
        let letter = DeadLetter::read(&message);
        if letter.of_campaign(campaign) {
            letters.push(letter);
        }
    }
    // Nothing was acked: closing puts every message back.
    broker::close_connection(&connection, "dead letters listed").await;
    Ok(letters)
}

/// Re-queues the dead letters of `campaign` (every one without it) as
/// fresh jobs; returns how many.
pub async fn redrive(
    broker: &Broker,
    topology: &Topology,
    campaign: Option<&str>,
) -> Result<usize, BrokerError> {
    let connection = broker.connection().await?;
    let channel = connection.create_channel().await?;
    let publisher = TxPublisher::on(channel.clone()).await?;
    let waiting = channel
        .queue_declare(
            topology.dead().as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    let mut redriven = 0;
    for _ in 0..waiting {
        let Some(message) = get(&channel, topology).await? else {
            break;
        };
        if !DeadLetter::read(&message).of_campaign(campaign) {
            continue;
        }
        let mut table: FieldTable = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        headers::remove(&mut table, &DEATH_HEADERS);
        let mut job = Message::new(JOB_MESSAGE_TYPE).headers(table);
        if let Some(id) = message.delivery.properties.message_id() {
            job = job.id(id.as_str());
        }
        publisher
            .send(&topology.jobs(), &message.delivery.data, job)
            .await?;
        // The job is queued before its dead letter goes, as a worker hands
        // off: a failure between the commits leaves a copy in both queues,
        // never in neither.
        publisher.commit().await?;
        message
            .delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await?;
        publisher.commit().await?;
        redriven += 1;
    }
    broker::close_connection(&connection, "dead letters redriven").await;
    Ok(redriven)
}

async fn get(
    channel: &lapin::Channel,
    topology: &Topology,
) -> Result<Option<BasicGetMessage>, BrokerError> {
    Ok(channel
        .basic_get(
            topology.dead().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await?)
}

/// `flotilla-producer dead ...`.
#[derive(Debug, clap::Subcommand)]
pub enum DeadCommand {
    /// One line per dead letter: campaign, device, reason and detail.
    List(DeadArgs),
    /// Put dead letters back on the jobs queue, as fresh jobs.
    Redrive(DeadArgs),
}

#[derive(Debug, clap::Args)]
pub struct DeadArgs {
    /// Only this campaign's dead letters.
    #[arg(long)]
    campaign: Option<String>,
    #[command(flatten)]
    broker: flotilla_common::cli::BrokerArgs,
}

impl DeadCommand {
    pub async fn run(self) -> Result<(), BrokerError> {
        match self {
            DeadCommand::List(args) => {
                let broker = Broker::new(&args.broker.amqp_url, "flotilla-producer dead list")?;
                let letters =
                    list(&broker, &args.broker.topology(), args.campaign.as_deref()).await?;
                for letter in &letters {
                    println!("{}", letter.line());
                }
                eprintln!("{} dead letter(s)", letters.len());
            }
            DeadCommand::Redrive(args) => {
                let broker = Broker::new(&args.broker.amqp_url, "flotilla-producer dead redrive")?;
                let redriven =
                    redrive(&broker, &args.broker.topology(), args.campaign.as_deref()).await?;
                eprintln!("{redriven} dead letter(s) re-queued");
            }
        }
        Ok(())
    }
}
