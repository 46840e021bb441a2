//! The Flotilla worker: takes a job from RabbitMQ, runs exactly one step of
//! it against the device's REST API, and re-enqueues it (at once for the
//! next step, through a delay queue for a poll) until it ends.
//!
//! Workers are stateless and any number run side by side: everything a
//! step needs is in the job, and everything it learns goes back into the job
//! or into the events stream.
//!
//! Layout:
//! - [`run`]: start-up, the ops endpoints, shutdown;
//! - `consumer`: connection lifecycle and the consume loop;
//! - `delivery`: one delivery, from decoding to the ack;
//! - `step`: the pipeline's rules around every driver (deadline, timeout,
//!   retries, cleanup);
//! - `driver`: the driver contract and the error vocabulary every step
//!   speaks;
//! - `device_http`, [`credentials`] (and `allowed_hosts`, where they may
//!   go), `support`: what drivers build on;
//! - `drivers`: one module per device API, and the table of drivers by
//!   kind; `registry`: that table as the delivery loop sees it;
//! - [`metrics`]: the worker's Prometheus metrics.

mod allowed_hosts;
mod chain;
pub mod config;
mod consumer;
pub mod credentials;
mod delivery;
mod device_http;
mod driver;
mod drivers;
mod fence;
mod lane;
pub mod metrics;
mod registry;
mod step;
mod support;

pub use config::{Listen, WorkerConfig};
pub use credentials::{CredentialStore, Credentials};

use delivery::Shared;
use flotilla_common::{Broker, BrokerError, TopologyError, ops};
use registry::Registry;
use std::{future::Future, sync::Arc};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What a step leaves of the broker's consumer timeout for its hand-off.
const HANDOFF_ROOM: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker turned the login down: at the first connection, or for
    /// longer than a worker waits for it to be fixed.
    #[error("{source}; giving up{}", if *connected_before { " after retrying for two minutes" } else { ": check the user, password and vhost of AMQP_URL" })]
    LoginRefused {
        source: BrokerError,
        connected_before: bool,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("building the device HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Keys(#[from] flotilla_common::signing::KeyringError),
    #[error("FLOTILLA_IMAGE_DIR {}: {source}", dir.display())]
    ImageDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs a worker until `shutdown` resolves, then stops taking deliveries,
/// lets in-flight steps finish (within the grace period) and returns.
pub async fn run(
    config: WorkerConfig,
    credentials: CredentialStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    flotilla_common::ensure_crypto_provider();
    let keyring = config.keys.keyring()?;
    let image_dir =
        match &config.image_dir {
            Some(dir) => Some(support::image::canonical_dir(dir).map_err(|source| {
                WorkerError::ImageDir {
                    dir: dir.clone(),
                    source,
                }
            })?),
            None => None,
        };
    info!(keys = ?keyring.key_ids().collect::<Vec<_>>(), signing = keyring.signing_key_id(), "job keys loaded");
    let registry = prometheus::Registry::new();
    let metrics = metrics::WorkerMetrics::new(&registry)
        .expect("a new registry has none of the worker's metrics yet");
    metrics.keys_held(keyring.key_ids());
    let readiness = Arc::new(ops::Readiness::default());
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });

    let ops_server = match config.metrics_addr {
        Listen::Off => None,
        Listen::On(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Metrics { addr, source })?;
            info!(addr = %listener.local_addr().unwrap_or(addr), "serving /metrics, /healthz and /readyz");
            let stop = token.clone();
            Some(tokio::spawn(ops::serve(
                listener,
                registry.clone(),
                readiness.clone(),
                async move { stop.cancelled().await },
            )))
        }
    };

    let name = config.name.clone().unwrap_or_else(host_name);
    let broker = Broker::new(&config.broker.amqp_url, &format!("flotilla-worker {name}"))?;
    let shared = Arc::new(Shared {
        topology: config.broker.topology(),
        control: Default::default(),
        registry: Registry::standard(),
        http: device_http::HttpClients::new(
            config.http_timeout,
            config.max_answer_size,
            config.concurrency,
        )?,
        credentials,
        keyring,
        image_dir,
        metrics,
        worker: name,
        step_limit: config.consumer_timeout.saturating_sub(HANDOFF_ROOM),
        return_limit: config.return_limit,
        panic_for_device: config.panic_for_device.clone(),
    });
    let result = consumer::run_sessions(&config, &broker, shared, &readiness, &token).await;
    token.cancel();
    if let Some(server) = ops_server {
        let _ = server.await;
    }
    result
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| format!("worker-{}", std::process::id()))
}
