//! The worker's settings, read once at start from flags or the environment.

pub use flotilla_common::cli::Listen;
use flotilla_common::cli::{BrokerArgs, parse_listen};
use std::time::Duration;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-worker",
    version,
    about = "Runs Flotilla upgrade jobs, one step per delivery."
)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Deliveries the broker may hand this worker ahead of its acks.
    #[arg(long, env = "FLOTILLA_PREFETCH", default_value_t = 200)]
    pub prefetch: u16,

    /// Steps this worker runs at once.
    #[arg(long, env = "FLOTILLA_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// After SIGTERM, how long in-flight steps may take to finish. Keep it
    /// longer than the longest step timeout of your campaigns.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "90s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Longest one HTTP request to a device may take.
    #[arg(long, env = "FLOTILLA_HTTP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_timeout: Duration,

    /// Where to serve /metrics, /healthz and /readyz; "off" to serve none.
    #[arg(long, env = "FLOTILLA_METRICS_ADDR", default_value = "0.0.0.0:9464", value_parser = parse_listen)]
    pub metrics_addr: Listen,

    /// This worker's name in events (defaults to the host name, which is the
    /// pod name on Kubernetes).
    #[arg(long, env = "FLOTILLA_WORKER_NAME")]
    pub name: Option<String>,
}

impl WorkerConfig {
    /// Defaults, with the given broker settings (for tests and the demo).
    pub fn new(broker: BrokerArgs) -> Self {
        WorkerConfig {
            broker,
            prefetch: 200,
            concurrency: 64,
            shutdown_grace: Duration::from_secs(90),
            http_timeout: Duration::from_secs(30),
            metrics_addr: Listen::Off,
            name: None,
        }
    }
}
