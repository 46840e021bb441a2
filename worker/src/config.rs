//! The worker's settings, read once at start from flags or the environment.

pub use flotilla_common::cli::Listen;
use flotilla_common::cli::{BrokerArgs, parse_listen};
use flotilla_common::signing::KeyArgs;
use std::{path::PathBuf, time::Duration};

/// 1 MiB: far more than any device API answer Flotilla reads.
pub const DEFAULT_MAX_ANSWER_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-worker",
    version,
    about = "Runs Flotilla upgrade jobs, one step per delivery."
)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The job keys deliveries are verified with and follow-ups signed
    /// with. A worker without one does not start.
    #[command(flatten)]
    pub keys: KeyArgs,

    /// The directory `file:` campaign images must lie in (after following
    /// links). Unset, `file:` images are refused.
    #[arg(long, env = "FLOTILLA_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,

    /// Steps this worker runs at once, each on a consumer of its own
    /// that takes one delivery at a time: the worker's prefetch.
    #[arg(long, env = "FLOTILLA_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// After SIGTERM, how long in-flight steps may take to finish. Keep it
    /// longer than the longest step timeout of your campaigns.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "90s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Longest one HTTP request to a device may take.
    #[arg(long, env = "FLOTILLA_HTTP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_timeout: Duration,

    /// RabbitMQ's `consumer_timeout` (rabbitmq.conf; 30 minutes unless
    /// changed): a delivery unacked this long closes its channel. A job
    /// whose `step_timeout` could outlast it, less a minute for the
    /// hand-off, fails (`config`) before its step runs.
    #[arg(long, env = "FLOTILLA_CONSUMER_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub consumer_timeout: Duration,

    /// The most bytes read of one device answer (`1048576`, `512KiB`,
    /// `4MiB`); a longer answer fails its step.
    #[arg(long, env = "FLOTILLA_MAX_ANSWER_SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_answer_size: u64,

    /// How often a job whose step panicked is returned to the queue before
    /// it is dead-lettered (`return_limit`). Counted by the workers in a
    /// header; keep it below the queue's delivery limit (20), which stays
    /// as a backstop.
    #[arg(long, env = "FLOTILLA_RETURN_LIMIT", default_value_t = 5)]
    pub return_limit: u32,

    /// Test hook: every step of this device's job panics, as a driver bug
    /// would. Not a
    /// flag or a setting.
    #[arg(skip)]
    pub panic_for_device: Option<String>,

    /// Where to serve /metrics, /healthz and /readyz; "off" to serve none.
    #[arg(long, env = "FLOTILLA_METRICS_ADDR", default_value = "0.0.0.0:9464", value_parser = parse_listen)]
    pub metrics_addr: Listen,

    /// This worker's name in events (defaults to the host name, which is the
    /// pod name on Kubernetes).
    #[arg(long, env = "FLOTILLA_WORKER_NAME")]
    pub name: Option<String>,
}

/// A size in bytes, with an optional `KiB` or `MiB` suffix.
fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (number, unit) = match trimmed {
        t if t.ends_with("MiB") => (&t[..t.len() - 3], 1 << 20),
        t if t.ends_with("KiB") => (&t[..t.len() - 3], 1 << 10),
        t => (t, 1),
    };
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size like 1048576, 512KiB or 4MiB"))
}

impl WorkerConfig {
    /// Defaults, with the given broker settings (for tests and the demo),
    /// and no job keys yet: set `keys`, or the worker will not start.
    pub fn new(broker: BrokerArgs) -> Self {
        WorkerConfig {
            broker,
            keys: KeyArgs::default(),
            image_dir: None,
            concurrency: 64,
            shutdown_grace: Duration::from_secs(90),
            http_timeout: Duration::from_secs(30),
            max_answer_size: DEFAULT_MAX_ANSWER_SIZE,
            consumer_timeout: Duration::from_secs(30 * 60),
            return_limit: 5,
            panic_for_device: None,
            metrics_addr: Listen::Off,
            name: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_or_without_a_unit() {
        assert_eq!(parse_size("1MiB"), Ok(DEFAULT_MAX_ANSWER_SIZE));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1MB").is_err());
    }
}
