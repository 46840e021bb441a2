//! Flotilla's integration tests: real RabbitMQ, real HTTP to the simulated
//! fleet, real processes. One module per area, all in one binary: linking
//! once instead of once per file saves a minute of every CI run.

// Test helpers may unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod adaptive_rate;
mod appliance_readings;
mod campaign_control;
mod cluster;
mod control_at_scale;
mod dead_letters;
mod dms_campaigns;
mod forecast;
mod hardening;
mod observability;
mod operator_cli;
mod otlp_export;
mod producer_cli;
mod resilience;
mod riverbed_flowgateway;
mod riverbed_netprofiler;
mod riverbed_npm;
mod riverbed_tls;
mod sps;
mod traces;
mod trust;
