use clap::Parser;
use flotilla_worker::{CredentialStore, WorkerConfig};
use tracing::{error, info};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = WorkerConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .init();
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
