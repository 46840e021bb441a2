//! The Flotilla producer: checks a campaign and its whole inventory, then
//! rolls it out as the campaign's controller: waves, rate, window, caps and
//! failure budget, every decision written to the events stream.
//!
//! - [`campaign`]: the campaign file;
//! - [`forecast`]: `plan`, the timeline the controller would follow;
//! - [`inventory_check`]: every problem of an inventory, in constant memory;
//! - [`rollout`]: the controller;
//! - [`state`]: a campaign as its events tell it;
//! - [`feed`]: reading the events and control streams, and a campaign from
//!   them;
//! - [`catalogue`]: where each campaign's events begin and end, and recent
//!   snapshots of running campaigns;
//! - [`report`]: `status`, `report` and `history`;
//! - [`pace_log`]: finishes over time, kept small for snapshots;
//! - [`status_view`]: a campaign's pace and ETA, and `status --format json`;
//! - [`progress`]: what `run` and `status --watch` print as a campaign moves;
//! - [`exit`]: the exit statuses;
//! - [`dead`]: `dead list` and `dead redrive`;
//! - [`metrics`]: what `run` exports to Prometheus.

pub mod campaign;
pub mod catalogue;
pub mod dead;
pub mod exit;
pub mod feed;
pub mod forecast;
pub mod inventory_check;
pub mod metrics;
pub mod pace_log;
pub mod progress;
pub mod report;
pub mod rollout;
pub mod state;
pub mod status_view;

pub use campaign::{Campaign, CampaignError, TlsSettings};
pub use feed::{FollowError, follow_campaign, read_campaign, read_status};
pub use inventory_check::{InventorySummary, check_inventory};
pub use rollout::controller::{RunSpec, run_campaign, send_command};
pub use state::CampaignState;

use sha2::{Digest, Sha256};
use std::path::Path;

use flotilla_common::{BrokerError, TopologyError};

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error(transparent)]
    Campaign(#[from] CampaignError),
    #[error("{path}: {problems} problem(s) found; nothing was published")]
    Inventory { path: String, problems: u64 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the inventory changed while it was being published: {0}")]
    InventoryChanged(String),
    #[error("campaign {campaign} was started with other files; give a changed campaign a new id")]
    Mismatch { campaign: String },
    #[error("campaign {campaign} is already being run by another producer")]
    AlreadyRunning { campaign: String },
    #[error("{0}")]
    Plan(String),
    #[error(
        "{whose}: its events from offset {wanted} of {stream} are gone ({}); \
         its state cannot be rebuilt. The streams keep records for {retention} (FLOTILLA_RETENTION)",
        match found {
            Some(found) if found > wanted => format!("aged out: the stream now starts at offset {found}"),
            Some(found) => format!("the stream was recreated: it ends before offset {wanted}, at {found}"),
            None => "the stream is empty".to_owned(),
        }
    )]
    EventsGone {
        whose: String,
        stream: String,
        wanted: u64,
        found: Option<u64>,
        retention: String,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

impl ProducerError {
    /// Whether the broker connection failed or dropped, so that a new one
    /// may do better; a refusal on a live connection (a queue that differs,
    /// a nack) is not.
    pub fn is_connection_loss(&self) -> bool {
        let amqp = match self {
            ProducerError::Broker(broker)
            | ProducerError::Topology(TopologyError::Connect(broker)) => match broker {
                BrokerError::ConnectionLost | BrokerError::Unreachable { .. } => return true,
                BrokerError::Amqp(error) => error,
                _ => return false,
            },
            ProducerError::Topology(TopologyError::Broker { source: error, .. }) => error,
            _ => return false,
        };
        !matches!(
            amqp.kind(),
            lapin::ErrorKind::ProtocolError(e) if matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
        )
    }
}

/// Identifies the files a campaign is run with: a restart must use the same.
pub fn fingerprint(files: &[&Path], extra: &str) -> Result<String, ProducerError> {
    let mut hasher = Sha256::new();
    for path in files {
        let mut file = std::fs::File::open(path).map_err(|source| ProducerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        std::io::copy(&mut file, &mut hasher).map_err(|source| ProducerError::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    hasher.update(extra.as_bytes());
    Ok(hex::encode(hasher.finalize()))
}
