use clap::Parser;
use flotilla_common::telemetry::{LogArgs, Telemetry};
use flotilla_worker::{CredentialStore, WorkerConfig};
use tracing::{error, info};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Cli { config, log } = Cli::parse();
    let _telemetry = Telemetry::init("flotilla-worker", log.log_format, "info,lapin=warn");
    info!(broker = %flotilla_common::broker::redact_url(&config.broker.amqp_url), prefix = %config.broker.prefix, "starting worker");
    match flotilla_worker::run(config, CredentialStore::from_env(), shutdown_signal()).await {
        Ok(()) => {
            info!("worker stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            error!(%error, "worker failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
