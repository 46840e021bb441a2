//! Command-line and environment settings every Flotilla process shares.

use crate::{
    DEFAULT_AMQP_URL, Topology,
    topology::{DEFAULT_PREFIX, DEFAULT_RETENTION, Retention},
};
use std::{net::SocketAddr, time::Duration};

/// Which broker and which set of queues to use.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,

    /// Prefix of every queue name; several Flotillas can share a broker.
    #[arg(long, env = "FLOTILLA_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// Delay tiers (one queue each) that polls and retries wait in. Every
    /// process of one Flotilla must use the same list.
    #[arg(
        long,
        env = "FLOTILLA_DELAY_TIERS",
        value_delimiter = ',',
        value_parser = humantime::parse_duration,
        default_value = "1s,5s,30s,2m,10m"
    )]
    pub delay_tiers: Vec<Duration>,

    /// How long the events, control and campaigns streams keep records
    /// (RabbitMQ `x-max-age`: 30D, 12h, ...), applied when they are first
    /// declared. A campaign cannot be resumed or reported on once its
    /// first events are older than this.
    #[arg(long, env = "FLOTILLA_RETENTION", default_value = DEFAULT_RETENTION)]
    pub retention: Retention,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology::new(&self.prefix)
            .with_delay_tiers(self.delay_tiers.clone())
            .with_retention(self.retention.clone())
    }
}

/// Where to serve the operations endpoints, or `off` to serve none: the
/// value of every process's `FLOTILLA_METRICS_ADDR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    On(SocketAddr),
}

impl Listen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::On(addr) => Some(addr),
        }
    }
}

/// A clap value parser for [`Listen`].
pub fn parse_listen(text: &str) -> Result<Listen, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(Listen::Off);
    }
    text.parse()
        .map(Listen::On)
        .map_err(|e| format!("{text:?} is neither an address like 0.0.0.0:9464 nor \"off\": {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_in_any_case_serves_nothing_and_addresses_parse() {
        assert_eq!(parse_listen("off"), Ok(Listen::Off));
        assert_eq!(parse_listen("OFF"), Ok(Listen::Off));
        assert_eq!(
            parse_listen("127.0.0.1:9465").map(Listen::addr),
            Ok(Some("127.0.0.1:9465".parse().unwrap()))
        );
        assert!(parse_listen("9465").unwrap_err().contains("nor \"off\""));
    }
}
